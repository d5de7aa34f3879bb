"""One worker-like OS process running `nightly-rollup` (used by the budget test).

Reads an operator's sealed token from TENANTFLOW_TEST_TOKEN and the client ids, one a
line, from the file named by the first argument; prints the final state's name.
"""

from __future__ import annotations

import asyncio
import os
import sys
from pathlib import Path
from uuid import UUID

from flows.nightly_rollup import nightly_rollup


async def main(client_ids: list[UUID]) -> None:
    state = await nightly_rollup(
        client_ids=client_ids,
        access_token=os.environ["TENANTFLOW_TEST_TOKEN"],
        return_state=True,
    )
    sys.stdout.write(f"{state.type.value} {state.message or ''}\n")


if __name__ == "__main__":
    asyncio.run(main([UUID(line) for line in Path(sys.argv[1]).read_text().split()]))
