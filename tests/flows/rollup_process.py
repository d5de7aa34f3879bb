"""One worker-like OS process running `nightly-rollup` (used by the budget test).

Reads an operator's sealed token (for every client) from TENANTFLOW_TEST_TOKEN and
rolls up every active client; prints the final state's name.
"""

from __future__ import annotations

import asyncio
import os
import sys

from flows.nightly_rollup import nightly_rollup


async def main() -> None:
    state = await nightly_rollup(
        access_token=os.environ["TENANTFLOW_TEST_TOKEN"],
        return_state=True,
    )
    sys.stdout.write(f"{state.type.value} {state.message or ''}\n")


if __name__ == "__main__":
    asyncio.run(main())
