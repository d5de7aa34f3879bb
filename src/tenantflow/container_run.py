"""A flow run in a container of the worker image: `python -m tenantflow.container_run NAME`.

The tenantflow docker and kubernetes workers (`tenantflow.container_workers`) start every
flow-run container with this command and the run's deployment name, nothing else. The
container looks `NAME` up in its own `prefect.yaml` (`TENANTFLOW_PROJECT_DIR`, `/app` in
the image), never in what the Prefect API says the deployment is, and:

* refuses (exit 2, one line on stderr) a deployment the image does not declare, and
  `migrate` or any deployment declared for `tenantflow-migrate`: the schema owner's login
  is never in a container's settings and the migrate run has its own process worker;
* runs the declared entrypoint through `tenantflow.flow_run` (the tripwire first, then
  Prefect's runtime-entrypoint engine on `PREFECT__FLOW_RUN_ID`): no pull step, no code
  from the API.

Its settings come from the environment the worker gives the container (the flow run's id
and Prefect's API URL) and from `/app/.env`, the worker's settings file mounted read-only
(`tenantflow.container_workers`): Prefect's and tenantflow's settings read `.env` in the
working folder; a variable of the environment wins over the file.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path

from tenantflow.deployments import MIGRATE_POOL
from tenantflow.errors import TenantflowError
from tenantflow.project import PROJECT_DIR_ENV, DeployError, declared_deployment

__all__ = ["ContainerRunRefused", "declared_container_entrypoint", "main"]

#: The flow-run process's exit code when it refuses its deployment.
REFUSED_EXIT = 2


class ContainerRunRefused(TenantflowError, RuntimeError):
    """The deployment may not run in a container of this image."""


def declared_container_entrypoint(name: str, project_dir: Path | None = None) -> str:
    """`<absolute path>:<function>` of the tenant deployment `name`, as the project declares it.

    Raises:
        ContainerRunRefused: no project folder, a deployment the project does not declare,
            one declared for `tenantflow-migrate`, or an entrypoint outside the project.
    """
    folder = project_dir or (
        Path(os.environ[PROJECT_DIR_ENV]) if PROJECT_DIR_ENV in os.environ else None
    )
    if folder is None:
        raise ContainerRunRefused(
            f"{PROJECT_DIR_ENV} is not set: a container runs only the deployments its own "
            "prefect.yaml declares"
        )
    project = folder.resolve()
    try:
        declared = declared_deployment(name, project)
    except DeployError as error:
        raise ContainerRunRefused(str(error)) from None
    if declared is None:
        raise ContainerRunRefused(
            f"deployment {name!r} is not declared in {project / 'prefect.yaml'}: a container "
            "runs only the project's own deployments"
        )
    if declared.work_pool == MIGRATE_POOL:
        raise ContainerRunRefused(
            f"deployment {name!r} is declared for {MIGRATE_POOL}: it runs on its own process "
            "worker only, never in a container"
        )
    path, colon, function = declared.entrypoint.rpartition(":")
    script = (project / path).resolve()
    if not colon or not function or project not in script.parents or not script.is_file():
        raise ContainerRunRefused(
            f"deployment {name!r}: its declared entrypoint {declared.entrypoint!r} is not a "
            f"file of {project}"
        )
    return f"{script}:{function}"


def main(argv: Sequence[str] | None = None) -> int:
    """Run the flow run of `PREFECT__FLOW_RUN_ID` for the deployment named in `argv`."""
    args = list(sys.argv[1:] if argv is None else argv)
    if len(args) != 1:
        sys.stderr.write("usage: python -m tenantflow.container_run DEPLOYMENT\n")
        return REFUSED_EXIT
    try:
        entrypoint = declared_container_entrypoint(args[0])
    except ContainerRunRefused as refusal:
        sys.stderr.write(f"refused: {refusal}\n")
        return REFUSED_EXIT
    from tenantflow.flow_run import main as run_flow

    return run_flow([entrypoint])


if __name__ == "__main__":
    raise SystemExit(main())
