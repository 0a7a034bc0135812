"""The import graph keeps the pipeline's shape: no module imports from a layer above its own,
the queue knows nothing of HTTP, routing or files, the core imports no vendor SDK, plugins
import only the public SPI, and docs/architecture.md lists every module.

The layers, bottom to top, are declared here and in docs/architecture.md; a new module goes
into one of them (the test fails until it does)."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
GATEWAY = ROOT / "gateway"

LAYERS: list[tuple[str, set[str]]] = [
    (
        "base",
        {
            "gateway",
            "gateway.tasks",
            "gateway.outcomes",
            "gateway.backoff",
            "gateway.config",
            "gateway.languages",
            "gateway.netguard",
            "gateway.http",
            "gateway.redaction",
            "gateway.loopback",
            "gateway.hookspecs",
            "gateway.metrics",
            "gateway.plugins",
            "gateway.supervision",
            "gateway.engines",
        },
    ),
    ("contracts", {"gateway.adapters", "gateway.adapter_options", "gateway.openai_shapes", "gateway.registry", "gateway.cpu"}),
    (
        "stages",
        {
            "gateway.bitrix",
            "gateway.bitrix.protocol",
            "gateway.bitrix.rest",
            "gateway.bitrix.registration",
            "gateway.routing",
            "gateway.files",
            "gateway.recordings",
            "gateway.delivery",
            "gateway.jobs",
            "gateway.jobs.model",
            "gateway.jobs.queue",
            "gateway.jobs.sqlite",
            "gateway.jobs.rows",
            "gateway.jobs.reports",
            "gateway.postgres",
            "gateway.postgres.database",
            "gateway.postgres.schema",
            "gateway.postgres.queue",
            "gateway.postgres.files",
            "gateway.postgres.tokens",
            "gateway.postgres.tenants",
            "gateway.tenants",
            "gateway.tenants.model",
            "gateway.tenants.events",
            "gateway.tenants.oauth",
            "gateway.tenants.store",
            "gateway.tenants.limits",
            "gateway.usage",
            "gateway.usage.ledger",
            "gateway.usage.sqlite",
            "gateway.usage.report",
            "gateway.postgres.usage",
        },
    ),
    ("pipeline", {"gateway.execution", "gateway.worker", "gateway.tenants.service"}),
    ("composition", {"gateway.stores", "gateway.runtime"}),
    (
        "entry points and tools",
        {
            "gateway.app",
            "gateway.admin",
            "gateway.admin.charts",
            "gateway.admin.filters",
            "gateway.admin.pages",
            "gateway.admin.passwords",
            "gateway.admin.sessions",
            "gateway.admin.site",
            "gateway.admin.throttle",
            "gateway.openai_api",
            "gateway.openai_api.capacity",
            "gateway.openai_api.errors",
            "gateway.openai_api.keys",
            "gateway.openai_api.parse",
            "gateway.openai_api.responses",
            "gateway.openai_api.routes",
            "gateway.server",
            "gateway.processes",
            "gateway.cli",
            "gateway.__main__",
            "gateway.demo",
            "gateway.bitrix.simulator",
            "gateway.bitrix.oauth_emulator",
            "gateway.spi",
            "gateway.testing",
            "gateway.testing.__main__",
            "gateway.testing.fixtures",
            "gateway.testing.runner",
            "gateway.testing.postgres",
            "gateway.testing.proxy",
            "gateway.testing.speech",
            "gateway.testing.upstream",
        },
    ),
]
LAYER_OF = {module: index for index, (_, modules) in enumerate(LAYERS) for module in modules}
VENDOR_SDKS = {"openai", "litellm", "llama_cpp", "faster_whisper", "ctranslate2"}
QUEUE_MUST_NOT_KNOW = {
    "httpx",
    "gateway.http",
    "gateway.routing",
    "gateway.delivery",
    "gateway.files",
    "gateway.recordings",
    "gateway.bitrix",
    "gateway.adapters",
    "gateway.execution",
}
"""The queue package stores jobs: it knows nothing of HTTP, routing, files or how a task runs."""
STAGES_BESIDE_THE_QUEUE = {"gateway.routing", "gateway.delivery", "gateway.execution", "gateway.bitrix.protocol"}
"""Stages that speak of outcomes through gateway.outcomes, not through the queue's job model."""


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def core_modules() -> dict[str, Path]:
    return {module_name(path): path for path in sorted(GATEWAY.rglob("*.py"))}


def imports(path: Path) -> set[str]:
    """Absolute module names a file imports (``from gateway import x`` counts as ``gateway.x`` when that is a module)."""
    found: set[str] = set()
    known = core_modules()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
            found.update(f"{node.module}.{alias.name}" for alias in node.names if f"{node.module}.{alias.name}" in known)
    return found


def core_imports(path: Path) -> set[str]:
    known = core_modules()
    return {name for name in imports(path) if name in known}


def test_every_module_has_a_layer():
    missing = sorted(set(core_modules()) - set(LAYER_OF))
    assert not missing, f"put these modules into a layer in tests/test_architecture.py and docs/architecture.md: {missing}"
    gone = sorted(set(LAYER_OF) - set(core_modules()))
    assert not gone, f"these modules no longer exist; drop them from the layers: {gone}"


def test_no_module_imports_from_a_layer_above_it():
    upward = []
    for module, path in core_modules().items():
        for imported in core_imports(path):
            if imported != "gateway" and LAYER_OF.get(imported, -1) > LAYER_OF.get(module, -1):
                upward.append(f"{module} ({LAYERS[LAYER_OF[module]][0]}) imports {imported} ({LAYERS[LAYER_OF[imported]][0]})")
    assert not upward, "imports from a layer above:\n" + "\n".join(sorted(upward))


def test_the_queue_knows_nothing_of_http_routing_or_files():
    leaks = [
        f"{module} imports {name}"
        for module, path in core_modules().items()
        if module.startswith("gateway.jobs")
        for name in imports(path)
        if any(name == banned or name.startswith(banned + ".") for banned in QUEUE_MUST_NOT_KNOW)
    ]
    assert not leaks, leaks


def test_routing_delivery_and_execution_do_not_reach_into_the_queue():
    modules = core_modules()
    leaks = [f"{module} imports {name}" for module in STAGES_BESIDE_THE_QUEUE for name in imports(modules[module]) if name.startswith("gateway.jobs")]
    assert not leaks, leaks


def test_the_core_imports_no_vendor_sdk():
    found = [f"{module} imports {name}" for module, path in core_modules().items() for name in imports(path) if name.split(".")[0] in VENDOR_SDKS]
    assert not found, found


# That plugins import only gateway.spi (and their tests gateway.testing) is tests/test_spi.py's.


def test_the_architecture_doc_lists_every_module_and_plugin():
    doc = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    section = doc.split("## Module map", 1)[1]
    listed = set(re.findall(r"^\s*-\s*`([\w./]+)`", section, re.MULTILINE))
    files = {str(path.relative_to(ROOT)) for path in GATEWAY.rglob("*.py")}
    files |= {f"{path.relative_to(ROOT)}/" for path in (ROOT / "plugins").glob("*") if path.is_dir() and (path / "pyproject.toml").exists()}
    missing = sorted(files - listed)
    assert not missing, f"add one line per module to the module map in docs/architecture.md: {missing}"
    stale = sorted(name for name in listed - files if name.startswith(("gateway/", "plugins/")))
    assert not stale, f"the module map names files that do not exist: {stale}"


def test_the_architecture_doc_shows_the_layers_of_this_test():
    doc = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8")
    for name, _ in LAYERS:
        assert f"**{name}**" in doc, f"docs/architecture.md does not describe the layer {name!r}"


def test_the_module_map_gives_each_module_the_layer_of_this_test():
    """The ``(layer)`` at the end of each module's line in the doc is the layer declared above."""
    section = (ROOT / "docs" / "architecture.md").read_text(encoding="utf-8").split("## Module map", 1)[1]
    wrong = []
    for path, tag in re.findall(r"^\s*-\s*`(gateway/[\w./]+\.py)`.*\(([a-z ]+)\)\s*$", section, re.MULTILINE):
        module = module_name(ROOT / path)
        index = LAYER_OF.get(module)
        layer = LAYERS[index][0] if index is not None else None
        if layer is not None and tag not in layer:  # "entry points" and "tools" both name the last layer
            wrong.append(f"{path}: the doc says ({tag}), the layer is {layer!r}")
    assert not wrong, wrong
