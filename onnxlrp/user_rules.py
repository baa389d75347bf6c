"""Your own composites and rules, without editing the package.

``--composite FILE.toml`` (or ``FILE.toml:NAME`` when the file holds several): composites in the format of
rules/composites.toml, each optionally with per-node overrides::

    [my_composite]
    signal = "relevance"
    first_layer = ["conv"]
    first = "zbox"
    conv = "gamma"
    dense = "epsilon"

    [[my_composite.override]]       # applied in order; a later match wins
    first = 2                       # the first 2 nodes of `category` on the relevance path, counted from the input
    category = "conv"
    rule = "gamma"
    gamma = 0.5

    [[my_composite.override]]
    glob = "*classifier*"           # or regex = "...", or node = "exact name"
    rule = "epsilon"
    epsilon = 0.25

``--rules DIR``: extra templates (``DIR/*.onnxtxt``: op templates and helpers; ``DIR/linear/*.onnxtxt``: linear
rules, instantiated for every linear op like the package's) and op table rows (``DIR/ops.toml``, merged into
rules/ops.toml row by row: a new op, or new rules for a known op).
"""
from __future__ import annotations

import fnmatch
import re
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

import onnx.parser

from .errors import OnnxlrpError

#: Rule parameters an override may set (the float options of composites.DEFAULT_OPTIONS).
OVERRIDE_PARAMETERS = ("epsilon", "stabilizer", "gamma", "alpha", "beta", "low", "high")
_SELECTORS = ("node", "glob", "regex", "first")


@dataclass
class Override:
    """A per-node rule and/or parameters, for the nodes its selector matches."""

    index: int  # position in the file (1-based), for messages and `inspect`
    node: str | None = None
    glob: str | None = None
    regex: re.Pattern | None = None
    first: int | None = None
    categories: tuple[str, ...] = ()
    rule: str | None = None
    params: dict = field(default_factory=dict)

    def describe(self) -> str:
        if self.node is not None:
            what = f"node {self.node!r}"
        elif self.glob is not None:
            what = f"glob {self.glob!r}"
        elif self.regex is not None:
            what = f"regex {self.regex.pattern!r}"
        else:
            what = f"first {self.first}"
        if self.categories:
            what += f" {'/'.join(self.categories)}"
        sets = ([f"rule={self.rule}"] if self.rule else []) + [f"{k}={v}" for k, v in self.params.items()]
        return f"override {self.index} ({what}): {', '.join(sets)}"


def is_composite_file(name: str) -> bool:
    """Whether a --composite value names a TOML file (``FILE.toml`` or ``FILE.toml:NAME``)."""
    return name.endswith(".toml") or ".toml:" in name


def split_composite_file(name: str) -> tuple[Path, str | None]:
    path, _, chosen = name.partition(".toml:") if ".toml:" in name else (name[: -len(".toml")], "", "")
    return Path(path + ".toml"), chosen or None


def read_composite_file(name: str) -> tuple[str, dict, list[Override], str]:
    """(composite name, its table, its overrides, the file's text) for ``FILE.toml`` or ``FILE.toml:NAME``."""
    path, chosen = split_composite_file(name)
    from .load import require_regular_file
    require_regular_file(path, "a composite file")  # a FIFO would block
    try:
        text = path.read_text(encoding="utf-8")
        tables = tomllib.loads(text)
    except OSError as exc:
        raise OnnxlrpError(f"{path}: cannot read the composite file ({exc.strerror or exc})") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
        raise OnnxlrpError(f"{path}: not a valid TOML composite file ({exc})") from None
    composites = {k: v for k, v in tables.items() if isinstance(v, dict) and k != "base"}
    if chosen is None:
        if len(composites) != 1:
            raise OnnxlrpError(f"{path}: holds {len(composites)} composites ({', '.join(composites) or 'none'}); "
                               f"choose one with --composite {path}:NAME")
        chosen = next(iter(composites))
    if chosen not in composites:
        raise OnnxlrpError(f"{path}: no composite {chosen!r}; it has: {', '.join(composites)}")
    table = dict(composites[chosen])
    raw = table.pop("override", [])
    if not isinstance(raw, list):
        raise OnnxlrpError(f"{path}: [{chosen}] override must be an array of tables ([[{chosen}.override]])")
    overrides = [_override(path, k + 1, entry) for k, entry in enumerate(raw)]
    table.setdefault("signal", "relevance")
    table.setdefault("zennit", f"user composite from {path.name}")
    return chosen, table, overrides, text


def _override(path: Path, index: int, entry: dict) -> Override:
    where = f"{path}: override {index}"
    if not isinstance(entry, dict):
        raise OnnxlrpError(f"{where}: must be a table")
    selectors = [k for k in _SELECTORS if k in entry]
    if len(selectors) != 1:
        raise OnnxlrpError(f"{where}: give exactly one of {', '.join(_SELECTORS)} (got {', '.join(selectors) or 'none'})")
    unknown = set(entry) - set(_SELECTORS) - {"category", "rule"} - set(OVERRIDE_PARAMETERS)
    if unknown:
        raise OnnxlrpError(f"{where}: unknown key(s) {', '.join(sorted(unknown))}; allowed: node, glob, regex, "
                           f"first, category, rule, {', '.join(OVERRIDE_PARAMETERS)}")
    categories = entry.get("category", ())
    categories = (categories,) if isinstance(categories, str) else tuple(categories)
    override = Override(index, categories=categories, rule=entry.get("rule"),
                        params={k: entry[k] for k in OVERRIDE_PARAMETERS if k in entry})
    if "node" in entry:
        override.node = str(entry["node"])
    elif "glob" in entry:
        override.glob = str(entry["glob"])
    elif "regex" in entry:
        try:
            override.regex = re.compile(str(entry["regex"]))
        except re.error as exc:
            raise OnnxlrpError(f"{where}: bad regex {entry['regex']!r} ({exc})") from None
    else:
        first = entry["first"]
        if not isinstance(first, int) or isinstance(first, bool) or first < 1:
            raise OnnxlrpError(f"{where}: first must be a positive integer, got {first!r}")
        if not categories:
            raise OnnxlrpError(f"{where}: first = N needs a category (e.g. category = \"conv\")")
        override.first = first
    if override.rule is None and not override.params:
        raise OnnxlrpError(f"{where}: sets neither a rule nor a parameter")
    return override


def override_matches(overrides: list[Override], names: dict[int, str], categories: dict[int, str | None],
                     path: list[int], depth: dict[int, int]) -> dict[int, list[Override]]:
    """Per node index on the path, the overrides that match it (in file order).

    depth: per node, how many nodes of its own category lie on the path from the input up to and including it
    (1 = the first such layer)."""
    matched: dict[int, list[Override]] = {}
    for i in path:
        name, category = names[i], categories[i]
        for o in overrides:
            if o.categories and category not in o.categories:
                continue
            hit = (o.node is not None and name == o.node) or \
                  (o.glob is not None and fnmatch.fnmatchcase(name, o.glob)) or \
                  (o.regex is not None and o.regex.search(name) is not None) or \
                  (o.first is not None and depth.get(i, 0) <= o.first)
            if hit:
                matched.setdefault(i, []).append(o)
    return matched


# --- --rules DIR ---------------------------------------------------------------------------------------------------

def load_rules_dir(directory: Path, functions: dict, linear_rules: dict, ops: dict) -> None:
    """Add DIR's templates and op rows to the library's tables (in place); OnnxlrpError naming the file."""
    directory = Path(directory)
    if not directory.is_dir():
        raise OnnxlrpError(f"{directory}: --rules must be a folder of templates (*.onnxtxt) and an ops.toml")
    for sub, table in (("", functions), ("linear", linear_rules)):
        folder = directory / sub if sub else directory
        if not folder.is_dir():
            continue
        for path in sorted(folder.glob("*.onnxtxt")):
            if not path.is_file():  # a FIFO would block, a folder is no template
                raise OnnxlrpError(f"{path}: not a regular file, not a template")
            try:
                function = onnx.parser.parse_function(path.read_text(encoding="utf-8"))
            except Exception as exc:  # onnx.parser.ParseError, OSError, UnicodeDecodeError
                raise OnnxlrpError(f"{path}: cannot parse the template ({str(exc).strip().splitlines()[0]})") \
                    from None
            name = path.stem if sub == "linear" else function.name
            if function.domain != "onnxlrp":
                raise OnnxlrpError(f"{path}: template {function.name} must be in domain \"onnxlrp\"")
            if name in table:
                raise OnnxlrpError(f"{path}: {name} already exists in the package's rules; give it another name")
            table[name] = function
    ops_file = directory / "ops.toml"
    if ops_file.exists():
        if not ops_file.is_file():
            raise OnnxlrpError(f"{ops_file}: not a regular file, not an ops table")
        try:
            rows = tomllib.loads(ops_file.read_text(encoding="utf-8"))
        except (OSError, tomllib.TOMLDecodeError, UnicodeDecodeError) as exc:
            raise OnnxlrpError(f"{ops_file}: not a valid ops table ({exc})") from None
        for op, row in rows.items():
            if not isinstance(row, dict):
                raise OnnxlrpError(f"{ops_file}: [{op}] must be a table")
            merged = {**ops.get(op, {}), **row}
            if "category" not in merged:
                raise OnnxlrpError(f"{ops_file}: [{op}] needs a category (activation, affine, conv, dense, ...)")
            _check_named(ops_file, op, merged)
            ops[op] = merged


def _check_named(ops_file: Path, op: str, row: dict) -> None:
    """OnnxlrpError where an op row names a binder or variant chooser the compiler does not have."""
    from .binders import BINDERS
    from .variants import VARIANTS
    for key, known in (("binder", BINDERS), ("variant", VARIANTS)):
        if key in row and row[key] not in known:
            raise OnnxlrpError(f"{ops_file}: [{op}] {key} = {row[key]!r} is not one of the compiler's "
                               f"({', '.join(sorted(known))})")


def rules_fingerprint(directories: tuple[str, ...]) -> list[tuple[str, str]]:
    """(relative path, content) of every file --rules reads, for cache keys and metadata."""
    files = []
    for directory in directories:
        root = Path(directory)
        for path in sorted(list(root.glob("*.onnxtxt")) + list(root.glob("linear/*.onnxtxt")) +
                           list(root.glob("ops.toml"))):
            files.append((str(path), path.read_text(encoding="utf-8", errors="replace") if path.is_file() else ""))
    return files


def category_depth(flow, categories: dict[int, str | None]) -> dict[int, int]:
    """Per node: the most nodes of its own category on any path from the input up to and including it (the
    first conv layer has depth 1, the convs right after it 2, ...). flow: the relevance path as a DiGraph."""
    import networkx as nx
    counts: dict[int, dict[str, int]] = {}
    depth: dict[int, int] = {}
    for i in nx.topological_sort(flow):
        seen: dict[str, int] = {}
        for p in flow.predecessors(i):
            for category, n in counts[p].items():
                seen[category] = max(seen.get(category, 0), n)
        category = categories.get(i)
        if category is not None:
            seen[category] = seen.get(category, 0) + 1
            depth[i] = seen[category]
        counts[i] = seen
    return depth


def user_files(composite: str, rules) -> list[tuple[str, str]]:
    """(name, content) of the user files a compile reads besides the model (a composite file, --rules folders):
    part of the compiled-model cache key, so that editing them recompiles."""
    files = []
    if is_composite_file(composite):
        path, _ = split_composite_file(composite)
        files.append((str(path), path.read_text(encoding="utf-8", errors="replace") if path.is_file() else ""))
    if rules:
        files += rules_fingerprint(tuple(str(r) for r in rules))
    return files
