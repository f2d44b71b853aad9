"""Hostile input, generated: every answer is one line, in bounded time and memory.

Each case runs edgekit in a child process with its address space capped (`RLIMIT_AS`, 4 GiB) and
must end with exit code 0, 1 or 2, with no traceback, and with exactly one `edgekit: ...` line on
stderr when it fails (none when it succeeds), within `LIMIT_S`. The inputs:

- inventories: generated mappings (known keys with wrong and right values, unknown and unicode
  keys, huge numbers, nan), generated alias structures (nested bombs, cycles, merges), valid files
  with hostile edits, random bytes and oversized files, each given to `edgekit devices`;
- argument lists for every command, built so that none starts a daemon or a compile: devices
  that are not in the inventory, flags with hostile values, unknown flags;
- model and weights files with bytes flipped, zeroed or cut off, loaded by the run's model stage
  (the daemon and the compile replaced by a stop), which only must stay within the same bounds.

Every device a generated inventory can reach is on loopback at a closed port (1 or 9) or on a host
name that does not resolve, so no case sends traffic off this machine or talks to a daemon.
A model-file case also pays for importing torch (seconds on a busy 2-core machine); its limit is
the time the intact file takes plus `LIMIT_S`.

Hypothesis runs with a fixed seed and about a minute of cases; `EDGEKIT_FUZZ_LONG=1` runs twenty
times as many with a fresh seed each time (a failure prints how to replay it).
"""

from __future__ import annotations

import os
import random
import resource
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator

import pytest
import yaml
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

REPO = Path(__file__).resolve().parent.parent
LONG = os.environ.get("EDGEKIT_FUZZ_LONG") == "1"
LIMIT_S = 5.0
MEMORY_BYTES = 4 << 30
CLOSED_PORTS = (9, 1)


def fuzz(examples: int) -> settings:
    return settings(max_examples=examples * (20 if LONG else 1), derandomize=not LONG,
                    deadline=None, database=None, print_blob=True,
                    # Every case is a child process: shrinking a failure could take many minutes.
                    phases=[Phase.explicit, Phase.generate],
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.filter_too_much,
                                           HealthCheck.function_scoped_fixture,
                                           HealthCheck.large_base_example])


# --- running edgekit --------------------------------------------------------------------------

@dataclass
class Outcome:
    argv: list[str]
    rc: int | None
    seconds: float
    stdout: str
    stderr: str

    def __str__(self) -> str:
        return (f"edgekit {self.argv!r}: exit {self.rc} after {self.seconds:.1f}s; stderr "
                f"{self.stderr[-1500:]!r}")


def _limits() -> None:
    resource.setrlimit(resource.RLIMIT_AS, (MEMORY_BYTES, MEMORY_BYTES))
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))


class Edgekit:
    """Runs `edgekit ARGS` (or edgekit's main under a `python -c` prelude) in a limited child."""

    def __init__(self, home: Path, cache: Path) -> None:
        self.home, self.cache = home, cache
        self.env = {"PATH": os.environ.get("PATH", "/usr/bin:/bin"), "HOME": str(home),
                    "LANG": "C.UTF-8", "PYTHONPATH": str(REPO), "EDGEKIT_CACHE": str(cache),
                    "PYTHONDONTWRITEBYTECODE": "1", "COLUMNS": "120"}

    def __call__(self, argv: list[str], prelude: str | None = None,
                 limit: float = LIMIT_S) -> Outcome:
        cmd = ([sys.executable, "-c", prelude] if prelude else
               [sys.executable, "-m", "hostkit.cli"]) + argv
        start = time.monotonic()
        proc = subprocess.Popen(cmd, cwd=self.home, env=self.env, stdin=subprocess.DEVNULL,
                                stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                preexec_fn=_limits, start_new_session=True)
        try:
            out, err = proc.communicate(timeout=limit + 10)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            out, err = proc.communicate()
        seconds = time.monotonic() - start
        try:  # a grandchild (the TVM target check) must not outlive its case
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        return Outcome(argv, proc.returncode, seconds, out.decode("utf-8", "replace"),
                       err.decode("utf-8", "replace"))


def check(outcome: Outcome, limit: float = LIMIT_S) -> None:
    lines = [line for line in outcome.stderr.splitlines() if line.strip()]
    assert outcome.rc in (0, 1, 2), outcome
    assert "Traceback" not in outcome.stderr, outcome
    assert outcome.seconds <= limit, outcome
    if outcome.rc == 0:
        assert not lines, outcome
    else:
        assert len(lines) == 1 and lines[0].startswith("edgekit: "), outcome


@pytest.fixture(scope="module")
def edgekit(tmp_path_factory: pytest.TempPathFactory) -> Edgekit:
    """A home and a cache of its own; the cache already holds TVM's verdicts on `TARGETS`, so a
    case pays for TVM only when it makes up a target (about 2 s)."""
    home = tmp_path_factory.mktemp("fuzz-home")
    runner = Edgekit(home, tmp_path_factory.mktemp("fuzz-cache"))
    warm = home / "targets.yaml"
    warm.write_text(yaml.safe_dump({"devices": {f"d{i}": {"target": t, "host": "localhost",
                                                          "port": 9}
                                                for i, t in enumerate(TARGETS)}}))
    outcome = runner(["devices", "-i", str(warm)], limit=60)
    assert outcome.rc == 1 and "devices.d2.target: unknown target tag" in outcome.stderr, outcome
    return runner


_names = iter(range(10**9))


def write(home: Path, data: bytes, suffix: str = ".yaml") -> Path:
    path = home / f"case-{next(_names)}{suffix}"
    path.write_bytes(data)
    return path


# --- inventories ------------------------------------------------------------------------------

TARGETS: list[Any] = [{"kind": "llvm"}, "raspberry-pi/4b-aarch64", "raspberry-pi/9",
                      {"kind": "nosuchkind"}, {"kind": "llvm", "mcpu": 5}, "llvm -mcpu=x",
                      {"kind": "llvm", "mtriple": "armv7l-linux-gnueabihf"},
                      {"kind": "llvm", "mtriple": "aarch64-linux-gnu"}]
SPECIALS = ["", " ", "\x00", "\n", "a\nb", "\t", "\x1b[2J", "\u202e", "\u200b", "\ufeff", "é" * 300,
            "\U0001f600", "-", "--help", "~", "null", "0x1F", "1e400", ".inf", "*a", "&a", "<<",
            "[/x]", "[bold]", "%s", "{0}", "../../etc/passwd"]
texts = st.one_of(st.text(st.characters(exclude_categories=["Cs"]), max_size=24),
                  st.sampled_from(SPECIALS))
numbers = st.one_of(st.integers(-(10**30), 10**30), st.floats(),
                    st.sampled_from([0, -5, -1, 65535, 65536, 70000, 2**63, 10**4000, 0.0, -0.0]))
scalars = st.one_of(st.none(), st.booleans(), numbers, texts)
anything = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4)
                        | st.dictionaries(texts, inner, max_size=4), max_leaves=10)
# Hosts that never leave this machine: loopback, or names that fail to resolve or to validate.
hosts = st.sampled_from(["localhost", "127.0.0.1", "::1", "no-such-host.invalid", "", "a..b",
                         "x y", "pi\x00", "é" * 300, "a" * 300])
ports: st.SearchStrategy[Any] = st.one_of(st.sampled_from(CLOSED_PORTS), numbers,
                                          st.sampled_from(["9", "abc", None, []]))
SSH = {"port": ports, "user": texts, "key_file": texts, "known_hosts": texts,
       "host_key_policy": st.sampled_from(["strict", "accept-new", "strcit"]) | texts,
       "work_dir": texts, "python": texts, "rpc_port": ports}
SETTINGS = {
    "target": st.sampled_from(TARGETS) | st.sampled_from(['{"kind": "llvm"}', "{not json",
                                                          '{"mcpu": "x"}', "[1]"]) | scalars,
    "transport": st.sampled_from(["rpc", "ssh", "tracker", "shh"]) | texts,
    "host": hosts | st.integers() | st.lists(hosts, max_size=2),
    "port": ports,
    "tracker": st.sampled_from(["localhost:9", "localhost:99999", "h:\u00b2", ":9", "x"]) | numbers,
    "key": texts, "cross_compiler": texts,
    "session_timeout": numbers | texts, "connect_timeout": numbers | texts,
    "format": st.sampled_from(["so", "tar", "zip"]) | scalars,
    "managed": st.sampled_from(["none", "local", "qemu-arm64", "docker"]) | scalars,
    "emulated": st.booleans() | scalars, "description": texts | anything,
    "ssh": st.fixed_dictionaries({}, optional=SSH) | anything,
}


def settings_maps(extra: dict[str, Any] | None = None) -> st.SearchStrategy[dict[Any, Any]]:
    known = st.fixed_dictionaries({}, optional={**SETTINGS, **(extra or {})})
    unknown = st.dictionaries(texts | st.sampled_from(["prot", "hots", "ssh.port"]), anything,
                              max_size=2)
    return st.builds(lambda a, b: {**b, **a}, known, unknown)


names = st.sampled_from(["pi4", "local", "jetson", "pi4-emu"]) | texts | st.integers()
group_names = st.lists(st.sampled_from(["arm", "slow", "missing"]) | texts, max_size=3)
inventories = st.one_of(
    st.fixed_dictionaries({}, optional={
        "defaults": settings_maps(),
        "groups": st.dictionaries(st.sampled_from(["arm", "slow"]) | texts, settings_maps(),
                                  max_size=3),
        "devices": st.dictionaries(names, settings_maps({"groups": group_names | texts}),
                                   max_size=4) | anything,
        "devicez": anything}),
    anything,
)


@fuzz(20)
@given(data=inventories, flow=st.sampled_from([None, True, False]), unicode=st.booleans(),
       json_out=st.booleans())
def test_generated_inventories(edgekit: Edgekit, data: Any, flow: bool | None, unicode: bool,
                               json_out: bool) -> None:
    text = yaml.safe_dump(data, default_flow_style=flow, allow_unicode=unicode, sort_keys=False)
    path = write(edgekit.home, text.encode("utf-8"))
    check(edgekit(["devices", "-i", str(path), *(["--json"] if json_out else [])]))


@st.composite
def alias_documents(draw: st.DrawFn) -> str:
    """Alias structures: nested bombs, cycles, merges, aliases to nothing, anchors re-used."""
    width, depth = draw(st.integers(1, 12)), draw(st.integers(1, 12))
    kind = draw(st.sampled_from(["bomb", "cycle", "merge", "undefined", "redefined", "deep"]))
    head = "devices:\n  x:\n    target: {kind: llvm}\n    host: localhost\n    port: 9\n"
    if kind == "bomb":
        levels = ['&a0 ["lol"]'] + [f"&a{i} [{', '.join([f'*a{i - 1}'] * width)}]"
                                    for i in range(1, depth)]
        return head + "    description:\n" + "".join(f"      - {level}\n" for level in levels)
    if kind == "cycle":
        return f"devices: &a\n  x: {'[' * depth}*a{']' * depth}\n"
    if kind == "merge":
        base = "groups:\n  arm: &g0 {port: 9}\n" + "".join(
            f"  g{i}: &g{i}\n    <<: *g{i - 1}\n" for i in range(1, depth))
        return base + f"devices:\n  x:\n    <<: *g{depth - 1}\n    target: {{kind: llvm}}\n"
    if kind == "undefined":
        return head + "    description: *nowhere\n"
    if kind == "redefined":
        return head.replace("port: 9", "port: &p 9") + "    connect_timeout: &p 1\n" \
            + "  y: {target: {kind: llvm}, port: *p, host: localhost}\n"
    return "devices: " + "[" * (depth * width) + "]" * (depth * width) + "\n"


@fuzz(10)
@given(text=alias_documents())
def test_alias_structures(edgekit: Edgekit, text: str) -> None:
    check(edgekit(["devices", "-i", str(write(edgekit.home, text.encode()))]))


VALID = ("defaults: {transport: rpc, connect_timeout: 2}\n"
         "groups:\n  arm-boards: {cross_compiler: aarch64-linux-gnu-gcc}\n"
         "devices:\n"
         "  pi4:\n    target: raspberry-pi/4b-aarch64\n    host: localhost\n    port: 9\n"
         "    groups: [arm-boards]\n"
         "  box:\n    target: {kind: llvm, mtriple: aarch64-linux-gnu}\n    host: localhost\n"
         "    port: 1\n    transport: ssh\n    ssh: {user: pi, port: 9}\n"
         "  nuc:\n    target: {kind: llvm}\n    transport: tracker\n    tracker: localhost:9\n"
         "    key: nuc\n")
# Edits hold no digits, so a port can be split or commented out but never become another port.
TOKENS = ["&a ", "*a", "[", "]", "{", "}", ": ", "- ", "\t", "\x00", "'", '"', "!!binary ",
          "!!python/object:os.system ", "<<: ", "\n  ", "\n", " #", "?", "é", "\U0001f600", "\\",
          "%YAML 1.1\n", "---\n", "...\n", "!", "|", ">", ",", "\ufeff", "\x85", "\u2028"]


@fuzz(12)
@given(edits=st.lists(st.tuples(st.sampled_from(["insert", "delete", "repeat"]),
                                st.floats(0, 1), st.sampled_from(TOKENS)), min_size=1, max_size=8))
def test_valid_inventory_with_hostile_edits(edgekit: Edgekit,
                                            edits: list[tuple[str, float, str]]) -> None:
    text = VALID
    for action, where, token in edits:
        at = int(where * len(text))
        if action == "insert":
            text = text[:at] + token + text[at:]
        elif action == "delete" and at < len(text) and not text[at].isdigit():
            text = text[:at] + text[at + 1:]
        elif action == "repeat":
            lines = text.splitlines(keepends=True)
            line = lines[int(where * (len(lines) - 1))]
            text = text + line if "port" not in line else text
    check(edgekit(["devices", "-i", str(write(edgekit.home, text.encode("utf-8", "replace")))]))


BIG = [b"#" * (1 << 20) + b"\n", b"devices: [" + b"1," * 400_000 + b"1]\n",
       b"devices:\n  x:\n    port: " + b"9" * 5000 + b"\n", b"\xef\xbb\xbf" + VALID.encode(),
       b"\xff\xfe" + VALID.encode("utf-16-le")]


@fuzz(6)
@given(data=st.binary(max_size=4000) | st.sampled_from(BIG), via_env=st.booleans())
def test_random_bytes_and_oversized_files(edgekit: Edgekit, data: bytes, via_env: bool) -> None:
    path = write(edgekit.home, data)
    if via_env:  # $EDGEKIT_INVENTORY is read exactly like --inventory
        edgekit.env["EDGEKIT_INVENTORY"] = str(path)
        try:
            check(edgekit(["devices"]))
        finally:
            del edgekit.env["EDGEKIT_INVENTORY"]
    else:
        check(edgekit(["devices", "-i", str(path)]))


def test_the_issue_examples_are_refused_by_devices(edgekit: Edgekit) -> None:
    """Issue 19's cases, each one line naming the file and what is wrong."""
    bomb = "".join(f"      - &a{i} [{', '.join([f'*a{i - 1}'] * 9) if i else 'lol'}]\n"
                   for i in range(10))
    cases = {
        "bomb": (VALID + "    description:\n" + bomb, "more than 32 aliases (*name)"),
        "tag": (VALID.replace("raspberry-pi/4b-aarch64", "raspberry-pi/9"),
                "devices.pi4.target: unknown target tag 'raspberry-pi/9'"),
        "kind": (VALID.replace("{kind: llvm}", "{kind: nosuchkind}"),
                 "devices.nuc.target: unknown target kind 'nosuchkind'"),
        "timeout": (VALID.replace("connect_timeout: 2", "connect_timeout: 0"),
                    "defaults.connect_timeout must be a number of seconds above 0"),
    }
    for name, (text, needle) in cases.items():
        path = write(edgekit.home, text.encode())
        outcome = edgekit(["devices", "-i", str(path)])
        check(outcome, limit=1.0 if name == "bomb" else LIMIT_S)
        assert outcome.rc == 1 and f"edgekit: error: {path}" in outcome.stderr, outcome
        assert needle in outcome.stderr, outcome
    junk = write(edgekit.home, random.Random(19).randbytes(10 << 20))
    outcome = edgekit(["devices", "-i", str(junk)])
    check(outcome)
    assert outcome.stderr == (f"edgekit: error: {junk}: larger than 1 MiB; an inventory is a short "
                              "YAML file (is this the right file?)\n")


# --- argument lists ---------------------------------------------------------------------------

FLAGS = ["--repeat", "--warmup", "--weights", "--input-shape", "--format", "--rtol", "--trials",
         "--trials-per-task", "--time-budget", "--csv", "--group", "-g", "--json",
         "--perturb", "--no-tuning", "--inventory", "-i", "--nope", "-x", "--", "-"]
# -v is left out: asking for debug lines is asking for more than one line.
flag_values = st.one_of(texts, st.sampled_from(["0", "-1", "nan", "inf", "1e400", "9" * 5000,
                                                "1,3,224,224", "1x3", "1,a", ",", "so", "zip",
                                                "\u0661\u0662", "\u00b2", "0.0", "-0"]))


@st.composite
def argument_lists(draw: st.DrawFn, inventory: str) -> list[str]:
    """Arguments that end at parsing or validation: a device is never one the inventory has."""
    command = draw(st.sampled_from(["deploy", "bench", "tune", "devices", "board", "device",
                                    "doctor", "fly", "", "--help", "--version", "-h"]))
    argv = [command] if command else []
    if command in ("deploy", "tune", "board", "device", "doctor") or (
            command == "bench" and draw(st.booleans())):
        argv += ["--device", draw(st.sampled_from(["pi5", "nope", "", "--json"]) | texts
                                  .filter(lambda t: t not in ("pi4", "box", "nuc")))]
    if command in ("board", "device"):
        argv.append(draw(st.sampled_from(["up", "down", "status", "install", "explode"])))
    for _ in range(draw(st.integers(0, 4))):
        argv.append(draw(st.sampled_from(FLAGS)))
        if draw(st.booleans()):
            argv.append(draw(flag_values))
    if command in ("deploy", "tune", "bench"):
        argv.append(draw(st.sampled_from(["resnet18", "tinycnn", "resnet181", "x.pt2"]) | texts))
    argv[1:1] = draw(st.sampled_from([[], ["-i", inventory], ["-i", "/nonexistent.yaml"],
                                      ["-i", "/"], ["-i", "/dev/null"]]))
    if "--all-devices" in argv:
        argv.remove("--all-devices")
    return [arg.replace("\x00", "") for arg in argv]  # no shell can pass a NUL in an argument


@fuzz(20)
@given(data=st.data())
def test_generated_argument_lists(edgekit: Edgekit, data: st.DataObject) -> None:
    inventory = edgekit.home / "fleet.yaml"
    if not inventory.exists():
        inventory.write_text(VALID)
    argv = data.draw(argument_lists(str(inventory)))
    check(edgekit(argv))


# --- model and weights files ------------------------------------------------------------------

# The run's model stage alone, as run_on_device calls it, then a stop: no daemon, no compile.
LOAD_ONLY = """
import sys
import hostkit.run.deploy as deploy
from hostkit.errors import EdgekitError
from hostkit.report.results import RunResult

def load_only(devices, specs, options, step=None, on_result=None):
    results = []
    for spec in specs:
        result = RunResult(device=devices[0].name, model=spec.name)
        try:
            deploy._ModelCache().get(spec)
            result.error, result.stage = "loaded; the fuzz stops before the daemon", "fuzz"
        except EdgekitError as exc:
            deploy._fail(result, exc)
        except Exception as exc:
            deploy.log.exception("unexpected error on %s", result.device)
            result.error, result.stage = f"unexpected error: {exc}", "internal"
        results.append(result)
    return results

deploy.run_fleet = load_only
from hostkit.cli import main
sys.exit(main(sys.argv[1:]))
"""
MAKE_MODELS = """
import sys, torch
from torch import nn
from hostkit.models.zoo import _tinycnn
torch.manual_seed(0)
net = nn.Sequential(nn.Linear(4, 3), nn.ReLU(), nn.Linear(3, 2)).eval()
torch.export.save(torch.export.export(net, (torch.randn(1, 4),)), sys.argv[1])
torch.save(_tinycnn().state_dict(), sys.argv[2])
"""


class ModelFiles:
    """The intact files, and per kind the command that loads one and its time limit."""

    def __init__(self, files: dict[str, Path], argv: dict[str, list[str]],
                 limit: dict[str, float]) -> None:
        self.files, self.argv, self.limit = files, argv, limit

    def __repr__(self) -> str:
        return f"ModelFiles(limit={self.limit})"


@pytest.fixture(scope="module")
def model_files(edgekit: Edgekit) -> Iterator[ModelFiles]:
    program, weights = edgekit.home / "net.pt2", edgekit.home / "tiny.pth"
    made = subprocess.run([sys.executable, "-c", MAKE_MODELS, str(program), str(weights)],
                          env=edgekit.env, capture_output=True, text=True, timeout=300)
    assert made.returncode == 0, made.stderr[-2000:]
    inventory = edgekit.home / "local.yaml"
    inventory.write_text("devices:\n  x: {target: {kind: llvm}, host: localhost, port: 9}\n")
    argv = {"pt2": ["deploy", "-i", str(inventory), "-d", "x", "{path}"],
            "weights": ["deploy", "-i", str(inventory), "-d", "x", "tinycnn", "--weights",
                        "{path}"]}
    limit = {}
    for kind, path in (("pt2", program), ("weights", weights)):
        intact = edgekit([a.replace("{path}", str(path)) for a in argv[kind]], prelude=LOAD_ONLY,
                         limit=120)
        assert intact.rc == 1, intact
        assert "loaded; the fuzz stops before the daemon" in intact.stderr, intact
        limit[kind] = intact.seconds + LIMIT_S
    yield ModelFiles({"pt2": program, "weights": weights}, argv, limit)


@st.composite
def mutations(draw: st.DrawFn, size: int) -> list[tuple[str, int, int]]:
    spots = st.integers(0, max(0, size - 1))
    return draw(st.lists(st.tuples(st.sampled_from(["flip", "zero", "cut"]), spots,
                                   st.integers(1, 64)), min_size=1, max_size=4))


def mutate(data: bytes, edits: list[tuple[str, int, int]]) -> bytes:
    out = bytearray(data)
    for action, at, n in edits:
        at = min(at, max(0, len(out) - 1))
        if action == "flip":
            out[at] ^= 1 << (n % 8)
        elif action == "zero":
            out[at:at + n] = bytes(len(out[at:at + n]))
        else:
            del out[at:]
    return bytes(out)


@pytest.mark.parametrize("kind", ["pt2", "weights"])
@fuzz(2)
@given(data=st.data())
def test_mutated_model_files(edgekit: Edgekit, model_files: ModelFiles, data: st.DataObject,
                             kind: str) -> None:
    original = model_files.files[kind].read_bytes()
    edits = data.draw(mutations(len(original)))
    path = write(edgekit.home, mutate(original, edits), ".pt2" if kind == "pt2" else ".pth")
    argv = [a.replace("{path}", str(path)) for a in model_files.argv[kind]]
    check(edgekit(argv, prelude=LOAD_ONLY), limit=model_files.limit[kind])
