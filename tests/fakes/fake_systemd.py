#!/usr/bin/env python3
"""A stand-in for `systemctl` and `journalctl`, enough for llm-router's end-to-end tests.

    fake_systemd.py --state-dir DIR systemctl [OPTIONS] VERB [UNIT...]
    fake_systemd.py --state-dir DIR journalctl -u UNIT [-n N] [--no-pager] [-o cat] [-q]

(--state-dir may also come from $FAKE_SYSTEMD_STATE_DIR.)  Stdlib only.

Layout of the state directory:
    units/<unit>.json     definitions written by tests: {"argv": [...], "env": {...}, "cwd": "...",
                          "stop_timeout": 5, "description": "...", "inherit_env": false}
    run/<unit>.json       runtime state (atomic replace; read without locks)
    lock/<unit>.lock      flock serialising start/stop/state changes of one unit
    journal/<unit>.log    the unit's stdout+stderr and systemd-like status lines

Semantics (as far as a router can observe them):
- start: Type=exec, returns once the process has been exec'd; the process runs in its own session and process
  group, detached, supervised by a small double-forked python process that records how it ended:
  exit 0 -> inactive, otherwise failed (Result=exit-code or signal).  Already active: no-op.
  The supervisor shows in `ps` as `fake_systemd.py --state-dir DIR --supervise UNIT MAINPID INVOCATION`.
- stop: KillMode=control-group on the process group: SIGTERM (+SIGCONT), wait until every process is gone,
  SIGKILL after stop_timeout; returns once they are gone.  A failed unit is reset to inactive.
- is-active / is-failed / show / reset-failed / restart / kill / status / daemon-reload like systemctl.

Faults (STATE_DIR/faults.json, read by every invocation, so a test can switch them on and off at any time; write it
with tests/fakes/fake_units.py's FakeSystemd.set_faults()):
    {"deny": {"start": ["UNIT", ...] or "*", "stop": [...], "restart": [...]},
     "deny_reason": "interactive" | "denied",
     "stop_delay": {"UNIT" or "*": SECONDS},
     "journal": "unreadable"}
- deny: polkit says no to a privileged verb on those units (the unprivileged verbs is-active/show/status/
  is-failed never need polkit): systemctl prints `Failed to start UNIT: Interactive authentication required.`
  (deny_reason "interactive", the default: no polkit rule admits the caller and --no-ask-password/no agent) or
  `Failed to start UNIT: Access denied` (deny_reason "denied": a rule returned polkit.Result.NO), then
  `See system logs and 'systemctl status UNIT' for details.`, and exits 1, changing nothing.
- stop_delay: `systemctl stop` of that unit sleeps SECONDS (unit stays active, not locked) before it acts: a
  stop job that queues behind something slow.
- journal "unreadable": journalctl prints `No journal files were opened due to insufficient permissions.` on
  stderr and exits 1, like a user outside the systemd-journal/adm groups.
A unit that does not stop on SIGTERM (the fake engine's FAKE_IGNORE_SIGTERM=1) is killed after its definition's
stop_timeout, journal `State 'stop-sigterm' timed out. Killing.`, as systemd does at TimeoutStopSec.
Limits: processes that leave the process group (setsid) escape `stop` (real systemd uses a cgroup).
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import json
import os
import signal
import sys
import time
from collections.abc import Iterator
from typing import Any

UNIT_SUFFIXES = (".service", ".socket", ".target", ".timer", ".mount", ".path", ".slice", ".scope", ".swap",
                 ".automount", ".device")
DEFAULT_STOP_TIMEOUT = 10.0
SELF = os.path.abspath(__file__)
ACTIVE_STATES = ("active", "activating", "reloading")
SUBSTATES = {"active": "running", "activating": "start", "reloading": "reload", "deactivating": "stop-sigterm",
             "inactive": "dead", "failed": "failed"}
SHOW_ORDER = ("Type", "Id", "Names", "Description", "LoadState", "ActiveState", "SubState", "Result", "MainPID",
              "ExecMainPID", "ExecMainCode", "ExecMainStatus", "InvocationID", "NRestarts", "KillMode",
              "TimeoutStopUSec", "FragmentPath", "WorkingDirectory", "UnitFileState")


# --------------------------------------------------------------------------------------------------------------
# state directory
# --------------------------------------------------------------------------------------------------------------
class Unit:
    def __init__(self, state_dir: str, name: str) -> None:
        self.state_dir = state_dir
        base = name[:-len(".service")] if name.endswith(".service") else name
        has_suffix = any(name.endswith(s) for s in UNIT_SUFFIXES)
        self.name = name if has_suffix else name + ".service"  # what systemctl prints
        self.key = self.name
        self.definition: dict[str, Any] | None = None
        self.def_path = ""
        for cand in (self.name, name, base):
            path = os.path.join(state_dir, "units", cand + ".json")
            try:
                with open(path, encoding="utf-8") as fh:
                    self.definition = json.load(fh)
            except FileNotFoundError:
                continue
            self.key, self.def_path = cand, path
            break

    @property
    def known(self) -> bool:
        return self.definition is not None

    def path(self, sub: str, ext: str) -> str:
        return os.path.join(self.state_dir, sub, self.key + ext)

    @property
    def description(self) -> str:
        desc = (self.definition or {}).get("description")
        return str(desc) if desc else self.name

    @property
    def stop_timeout(self) -> float:
        try:
            return float((self.definition or {}).get("stop_timeout", DEFAULT_STOP_TIMEOUT))
        except (TypeError, ValueError):
            return DEFAULT_STOP_TIMEOUT

    def read_state(self) -> dict[str, Any]:
        try:
            with open(self.path("run", ".json"), encoding="utf-8") as fh:
                data = json.load(fh)
                if isinstance(data, dict):
                    return data
        except (FileNotFoundError, ValueError):
            pass
        return {"state": "inactive", "result": "success", "main_pid": 0, "exec_main_pid": 0,
                "exec_main_code": 0, "exec_main_status": 0, "invocation": ""}

    def write_state(self, state: dict[str, Any]) -> None:
        path = self.path("run", ".json")
        tmp = f"{path}.{os.getpid()}.tmp"
        with open(tmp, "w", encoding="utf-8") as fh:
            json.dump(state, fh)
        os.replace(tmp, path)

    def effective_state(self) -> dict[str, Any]:
        """The recorded state, corrected when the supervisor vanished without recording an end."""
        st = self.read_state()
        if st.get("state") in ("active", "activating", "reloading", "deactivating"):
            sup = int(st.get("supervisor_pid") or 0)
            if sup and not pid_alive(sup) and not group_alive(int(st.get("main_pid") or 0)):
                st.update(state="failed", result="signal" if st.get("state") != "deactivating" else "success",
                          main_pid=0)
                if st["result"] == "success":
                    st["state"] = "inactive"
        return st

    @contextlib.contextmanager
    def lock(self) -> Iterator[int]:
        fd = os.open(self.path("lock", ".lock"), os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            yield fd
        finally:
            os.close(fd)

    def journal(self, *lines: str) -> None:
        data = "".join(line + "\n" for line in lines).encode()
        fd = os.open(self.path("journal", ".log"), os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_CLOEXEC, 0o644)
        try:
            os.write(fd, data)
        finally:
            os.close(fd)


def ensure_dirs(state_dir: str) -> None:
    for sub in ("units", "run", "lock", "journal"):
        os.makedirs(os.path.join(state_dir, sub), exist_ok=True)


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def group_alive(pgid: int) -> bool:
    if pgid <= 1:
        return False
    try:
        os.killpg(pgid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def signal_group(pgid: int, sig: int) -> None:
    if pgid > 1:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, sig)


def become_subreaper() -> None:
    with contextlib.suppress(Exception):
        import ctypes

        ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0)  # PR_SET_CHILD_SUBREAPER


def reap_children() -> None:
    while True:
        try:
            pid, _ = os.waitpid(-1, os.WNOHANG)
        except ChildProcessError:
            return
        if pid == 0:
            return


def wait_group_gone(pgid: int, timeout: float, reap: bool = False) -> bool:
    deadline = time.monotonic() + timeout
    delay = 0.002
    while True:
        if reap:
            reap_children()
        if not group_alive(pgid):
            break
        if time.monotonic() >= deadline:
            return False
        time.sleep(delay)
        delay = min(delay * 1.5, 0.02)
    return True


def exit_description(code: int, status: int) -> str:
    if code == 1:
        names = {0: "SUCCESS", 1: "FAILURE", 2: "INVALIDARGUMENT", 3: "NOTIMPLEMENTED", 4: "NOPERMISSION",
                 5: "NOTINSTALLED", 6: "NOTCONFIGURED", 7: "NOTRUNNING", 203: "EXEC"}
        return f"code=exited, status={status}/{names.get(status, str(status))}"
    try:
        name = signal.Signals(status).name[3:]
    except ValueError:
        name = str(status)
    return f"code=killed, status={status}/{name}"


# --------------------------------------------------------------------------------------------------------------
# start: fork a detached supervisor that execs the unit's command and records its end
# --------------------------------------------------------------------------------------------------------------
def build_env(definition: dict[str, Any], invocation: str) -> dict[str, str]:
    if definition.get("inherit_env"):
        env = dict(os.environ)
    else:
        env = {"PATH": os.environ.get("PATH") or "/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin",
               "LANG": os.environ.get("LANG") or "C.UTF-8"}
        for name in ("HOME", "USER", "LOGNAME", "TMPDIR"):
            if name in os.environ:
                env[name] = os.environ[name]
    env["INVOCATION_ID"] = invocation
    for key, value in (definition.get("env") or {}).items():
        env[str(key)] = str(value)
    return env


def supervise(unit: Unit, invocation: str, report_fd: int) -> None:
    """Runs in the detached grandchild: exec the unit, report, wait, record the end. Never returns."""
    import subprocess  # only the supervisor needs it

    definition = unit.definition or {}
    argv = [str(a) for a in definition.get("argv") or []]
    cwd = definition.get("cwd") or None
    journal_fd = os.open(unit.path("journal", ".log"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        if not argv:
            raise FileNotFoundError(errno.ENOENT, "empty argv in unit definition")
        proc = subprocess.Popen(argv, cwd=cwd, env=build_env(definition, invocation), stdin=subprocess.DEVNULL,
                                stdout=journal_fd, stderr=journal_fd, start_new_session=True, close_fds=True)
    except OSError as exc:
        step = "CHDIR" if cwd and not os.path.isdir(cwd) else "EXEC"
        what = cwd if step == "CHDIR" else (argv[0] if argv else "")
        msg = f"{unit.name}: Failed at step {step} spawning {what}: {exc.strerror or exc}"
        os.write(report_fd, f"err {200 if step == 'CHDIR' else 203} {msg}\n".encode())
        os._exit(0)
    os.write(report_fd, f"ok {proc.pid} {os.getpid()}\n".encode())
    os.close(report_fd)
    os.close(journal_fd)
    # Re-exec (same pid, the unit's process stays our child) so that `ps` shows a supervisor, not a
    # `systemctl start` that looks stuck.  Falls back to waiting right here.
    with contextlib.suppress(OSError):
        os.execv(sys.executable, [sys.executable, "-I", SELF, "--state-dir", unit.state_dir, "--supervise",
                                  unit.key, str(proc.pid), invocation])
    wait_and_record(unit, proc.pid, invocation)


def wait_and_record(unit: Unit, main_pid: int, invocation: str) -> None:
    """Wait for the unit's main process, clean up its process group, record how it ended. Never returns."""
    become_subreaper()  # like systemd, adopt and reap the unit's orphans (this host's init reaps slowly)
    status = 0
    while True:
        try:
            pid, status = os.waitpid(-1, 0)
        except ChildProcessError:
            break
        if pid == main_pid:
            break
    rc = os.waitstatus_to_exitcode(status)
    # KillMode=control-group: whatever is left in the group goes when the main process ends
    if group_alive(main_pid):
        signal_group(main_pid, signal.SIGTERM)
        if not wait_group_gone(main_pid, unit.stop_timeout, reap=True):
            signal_group(main_pid, signal.SIGKILL)
            wait_group_gone(main_pid, 5, reap=True)
    code, status = (1, rc) if rc >= 0 else (2, -rc)
    with unit.lock():
        st = unit.read_state()
        if st.get("invocation") != invocation:
            os._exit(0)
        st.update(exec_main_code=code, exec_main_status=status, main_pid=0)
        if st.get("state") in ("active", "activating", "reloading"):
            if rc == 0:
                st.update(state="inactive", result="success")
                unit.journal(f"{unit.name}: Deactivated successfully.")
            else:
                result = "exit-code" if code == 1 else "signal"
                st.update(state="failed", result=result)
                unit.journal(f"{unit.name}: Main process exited, {exit_description(code, status)}",
                             f"{unit.name}: Failed with result '{result}'.")
        unit.write_state(st)
    os._exit(0)


def spawn(unit: Unit, invocation: str) -> tuple[bool, int, int, str]:
    """Double fork; returns (ok, main_pid, supervisor_pid, error message)."""
    rfd, wfd = os.pipe()
    pid = os.fork()
    if pid == 0:  # intermediate child
        try:
            os.close(rfd)
            if wfd < 3:
                wfd = fcntl.fcntl(wfd, fcntl.F_DUPFD, 3)
            os.setsid()
            null = os.open(os.devnull, os.O_RDWR)
            for fd in (0, 1, 2):
                os.dup2(null, fd)
            if null > 2:
                os.close(null)
            os.closerange(3, wfd)
            os.closerange(wfd + 1, 65536)  # drop the caller's descriptors, including our lock
            if os.fork() == 0:
                try:
                    supervise(unit, invocation, wfd)
                finally:
                    os._exit(1)
        finally:
            os._exit(0)
    os.close(wfd)
    chunks = []
    while True:
        data = os.read(rfd, 4096)
        if not data:
            break
        chunks.append(data)
    os.close(rfd)
    os.waitpid(pid, 0)
    reply = b"".join(chunks).decode(errors="replace").strip()
    if reply.startswith("ok "):
        _, main_pid, sup_pid = reply.split()
        return True, int(main_pid), int(sup_pid), ""
    if reply.startswith("err "):
        _, status, msg = reply.split(" ", 2)
        return False, int(status), 0, msg
    return False, 203, 0, f"{unit.name}: supervisor failed to start the unit"


def read_faults(state_dir: str) -> dict[str, Any]:
    try:
        with open(os.path.join(state_dir, "faults.json"), encoding="utf-8") as fh:
            data = json.load(fh)
            return data if isinstance(data, dict) else {}
    except (FileNotFoundError, ValueError):
        return {}


def denied(faults: dict[str, Any], verb: str, unit: Unit) -> bool:
    """polkit refuses VERB on UNIT: print systemctl's message; True when refused."""
    units = (faults.get("deny") or {}).get(verb)
    if not units or not (units == "*" or unit.name in units or unit.key in units):
        return False
    reason = "Access denied" if faults.get("deny_reason") == "denied" else "Interactive authentication required."
    err(f"Failed to {verb} {unit.name}: {reason}\nSee system logs and 'systemctl status {unit.name}' for details.")
    return True


def stop_delay(faults: dict[str, Any], unit: Unit) -> float:
    delays = faults.get("stop_delay") or {}
    value = delays.get(unit.name, delays.get(unit.key, delays.get("*", 0)))
    try:
        return max(0.0, float(value))
    except (TypeError, ValueError):
        return 0.0


def cmd_start(unit: Unit) -> int:
    if not unit.known:
        err(f"Failed to start {unit.name}: Unit {unit.name} not found.")
        return 5
    with unit.lock():
        st = unit.effective_state()
        if st.get("state") in ACTIVE_STATES:
            return 0
        invocation = os.urandom(16).hex()
        ok, pid_or_status, sup_pid, msg = spawn(unit, invocation)
        new: dict[str, Any] = {"invocation": invocation, "supervisor_pid": sup_pid, "since": time.time(),
                               "n_restarts": 0}
        if ok:
            new.update(state="active", result="success", main_pid=pid_or_status, exec_main_pid=pid_or_status,
                       exec_main_code=0, exec_main_status=0)
            unit.write_state(new)
            unit.journal(f"Started {unit.description}.")
            return 0
        new.update(state="failed", result="exit-code", main_pid=0, exec_main_pid=0, exec_main_code=1,
                   exec_main_status=pid_or_status)
        unit.write_state(new)
        unit.journal(msg, f"{unit.name}: Main process exited, {exit_description(1, pid_or_status)}",
                     f"{unit.name}: Failed with result 'exit-code'.", f"Failed to start {unit.description}.")
    err(f"Job for {unit.name} failed because the control process exited with error code.\n"
        f'See "systemctl status {unit.name}" and "journalctl -xeu {unit.name}" for details.')
    return 1


def cmd_stop(unit: Unit) -> int:
    if not unit.known:
        err(f"Failed to stop {unit.name}: Unit {unit.name} not loaded.")
        return 5
    with unit.lock():
        st = unit.effective_state()
        state = st.get("state")
        pgid = int(st.get("main_pid") or 0)
        if state == "failed":
            signal_group(pgid, signal.SIGKILL)
            st.update(state="inactive", result="success", main_pid=0)
            unit.write_state(st)
            return 0
        if state not in ("active", "activating", "reloading", "deactivating"):
            return 0
        st["state"] = "deactivating"
        unit.write_state(st)
        unit.journal(f"Stopping {unit.description}...")
        signal_group(pgid, signal.SIGTERM)
        signal_group(pgid, signal.SIGCONT)
        if not wait_group_gone(pgid, unit.stop_timeout):
            unit.journal(f"{unit.name}: State 'stop-sigterm' timed out. Killing.")
            signal_group(pgid, signal.SIGKILL)
            wait_group_gone(pgid, 10)
            unit.journal(f"{unit.name}: Main process exited, code=killed, status=9/KILL")
        st.update(state="inactive", result="success", main_pid=0)
        unit.write_state(st)
        unit.journal(f"{unit.name}: Deactivated successfully.", f"Stopped {unit.description}.")
    return 0


def cmd_kill(unit: Unit, sig: int) -> int:
    if not unit.known:
        err(f"Failed to kill unit {unit.name}: Unit {unit.name} not loaded.")
        return 5
    st = unit.effective_state()
    if st.get("state") in ("active", "activating", "reloading", "deactivating"):
        signal_group(int(st.get("main_pid") or 0), sig)
    return 0


def cmd_reset_failed(unit: Unit) -> int:
    if not unit.known:
        err(f"Failed to reset failed state of unit {unit.name}: Unit {unit.name} not loaded.")
        return 1
    with unit.lock():
        st = unit.effective_state()
        if st.get("state") == "failed":
            st.update(state="inactive", result="success")
            unit.write_state(st)
    return 0


def properties(unit: Unit) -> dict[str, str]:
    st = unit.effective_state() if unit.known else unit.read_state()
    state = str(st.get("state") or "inactive")
    running = state in ("active", "activating", "reloading", "deactivating")
    definition = unit.definition or {}
    return {
        "Type": "exec",
        "Id": unit.name,
        "Names": unit.name,
        "Description": unit.description,
        "LoadState": "loaded" if unit.known else "not-found",
        "ActiveState": state,
        "SubState": SUBSTATES.get(state, "dead"),
        "Result": str(st.get("result") or "success"),
        "MainPID": str(int(st.get("main_pid") or 0) if running else 0),
        "ExecMainPID": str(int(st.get("exec_main_pid") or 0)),
        "ExecMainCode": str(int(st.get("exec_main_code") or 0)),
        "ExecMainStatus": str(int(st.get("exec_main_status") or 0)),
        "InvocationID": str(st.get("invocation") or ""),
        "NRestarts": str(int(st.get("n_restarts") or 0)),
        "KillMode": "control-group",
        "TimeoutStopUSec": f"{unit.stop_timeout:g}s",
        "FragmentPath": unit.def_path,
        "WorkingDirectory": str(definition.get("cwd") or ""),
        "UnitFileState": "disabled" if unit.known else "",
    }


def tail_lines(path: str, n: int | None) -> list[str]:
    try:
        with open(path, "rb") as fh:
            if n is not None:
                fh.seek(0, os.SEEK_END)
                size = fh.tell()
                fh.seek(max(0, size - max(65536, n * 1024)))
            data = fh.read()
    except FileNotFoundError:
        return []
    lines = data.decode("utf-8", "replace").splitlines()
    if n is None:
        return lines
    return lines[-n:] if n > 0 else []


# --------------------------------------------------------------------------------------------------------------
# command lines
# --------------------------------------------------------------------------------------------------------------
def err(msg: str) -> None:
    sys.stderr.write(msg + "\n")


def out(msg: str) -> None:
    sys.stdout.write(msg + "\n")


def parse_signal(name: str) -> int:
    name = name.upper()
    if name.isdigit():
        return int(name)
    if not name.startswith("SIG"):
        name = "SIG" + name
    return int(signal.Signals[name])


def systemctl(state_dir: str, args: list[str]) -> int:
    quiet = value_only = False
    props: list[str] = []
    sig = signal.SIGTERM
    words: list[str] = []
    i = 0
    while i < len(args):
        a = args[i]
        if a in ("-q", "--quiet"):
            quiet = True
        elif a == "--value":
            value_only = True
        elif a in ("-p", "--property") and i + 1 < len(args):
            props += args[i + 1].split(",")
            i += 1
        elif a.startswith("--property="):
            props += a.split("=", 1)[1].split(",")
        elif a.startswith("-p") and len(a) > 2 and not a.startswith("--"):
            props += a[2:].split(",")
        elif a in ("-s", "--signal") and i + 1 < len(args):
            sig = parse_signal(args[i + 1])
            i += 1
        elif a.startswith("--signal="):
            sig = parse_signal(a.split("=", 1)[1])
        elif a.startswith("-") and len(a) > 1:
            pass  # --no-pager, --no-ask-password, --no-block, --system, -l, --full, ...
        else:
            words.append(a)
        i += 1
    if not words:
        err("fake systemctl: a verb is required")
        return 1
    verb, names = words[0], words[1:]
    units = [Unit(state_dir, n) for n in names]
    if verb in ("start", "stop", "restart", "try-restart", "reload-or-restart", "kill", "is-active", "is-failed",
                "show", "status") and not units and verb != "show":
        err(f"Too few arguments for {verb}.")
        return 1
    faults = read_faults(state_dir)
    if verb in ("start", "stop", "restart", "reload-or-restart", "try-restart", "kill", "reset-failed"):
        for u in units:
            if u.known and denied(faults, "restart" if "restart" in verb else verb, u):
                return 1
    if verb == "start":
        return max((cmd_start(u) for u in units), default=0)
    if verb == "stop":
        for u in units:
            delay = stop_delay(faults, u) if u.known else 0.0
            if delay:
                time.sleep(delay)
        return max((cmd_stop(u) for u in units), default=0)
    if verb in ("restart", "reload-or-restart", "try-restart"):
        rc = 0
        for u in units:
            if not u.known:
                err(f"Failed to restart {u.name}: Unit {u.name} not found.")
                rc = 5
                continue
            if verb == "try-restart" and u.effective_state().get("state") not in ACTIVE_STATES:
                continue
            cmd_stop(u)
            rc = max(rc, cmd_start(u))
        return rc
    if verb == "kill":
        return max((cmd_kill(u, sig) for u in units), default=0)
    if verb == "reset-failed":
        if not units:
            units = [Unit(state_dir, f[:-5]) for f in sorted(os.listdir(os.path.join(state_dir, "units")))
                     if f.endswith(".json")]
        return max((cmd_reset_failed(u) for u in units), default=0)
    if verb in ("is-active", "is-failed"):
        states = [str(u.effective_state().get("state") or "inactive") if u.known else "inactive" for u in units]
        if not quiet:
            for s in states:
                out(s)
        if verb == "is-active":
            return 0 if any(s == "active" for s in states) else 3  # like systemctl: 0 if at least one is active
        return 0 if any(s == "failed" for s in states) else 1
    if verb == "show":
        blocks = []
        for u in units:
            p = properties(u)
            keys = props or list(SHOW_ORDER)
            lines = [(p[k] if value_only else f"{k}={p[k]}") for k in keys if k in p]
            blocks.append("\n".join(lines))
        if blocks:
            out("\n\n".join(blocks))
        return 0
    if verb == "status":
        rc = 0
        for u in units:
            if not u.known:
                err(f"Unit {u.name} could not be found.")
                rc = max(rc, 4)
                continue
            p = properties(u)
            state = p["ActiveState"]
            out(f"● {u.name} - {u.description}")
            out(f"     Loaded: loaded ({u.def_path}; disabled)")
            out(f"     Active: {state} ({p['SubState']})")
            if p["MainPID"] != "0":
                out(f"   Main PID: {p['MainPID']}")
            out("")
            for line in tail_lines(u.path("journal", ".log"), 10):
                out(line)
            rc = max(rc, 0 if state == "active" else 3)
        return rc
    if verb in ("daemon-reload", "enable", "disable", "preset", "mask", "unmask"):
        return 0
    err(f"Unknown command verb '{verb}'.")
    return 1


def journalctl(state_dir: str, args: list[str]) -> int:
    if read_faults(state_dir).get("journal") == "unreadable":
        err("No journal files were opened due to insufficient permissions.")
        return 1
    units: list[str] = []
    n: int | None = None  # None: the whole journal
    quiet = False
    i = 0
    while i < len(args):
        a = args[i]
        nxt = args[i + 1] if i + 1 < len(args) else None
        if a in ("-u", "--unit") and nxt is not None:
            units.append(nxt)
            i += 1
        elif a.startswith("--unit="):
            units.append(a.split("=", 1)[1])
        elif a.startswith("-u") and len(a) > 2 and not a.startswith("--"):
            units.append(a[2:])
        elif a.startswith("-") and not a.startswith("--") and a.endswith("u") and nxt is not None:
            units.append(nxt)  # combined short options such as -xeu UNIT
            i += 1
        elif a in ("-n", "--lines") and nxt is not None and (nxt.lstrip("+").isdigit() or nxt == "all"):
            n = None if nxt == "all" else int(nxt.lstrip("+"))
            i += 1
        elif a in ("-n", "--lines"):
            n = 10
        elif a.startswith("--lines="):
            val = a.split("=", 1)[1]
            n = None if val == "all" else int(val.lstrip("+"))
        elif a.startswith("-n") and a[2:].isdigit():
            n = int(a[2:])
        elif a == "-e" or a == "--pager-end":
            n = 1000 if n is None else n
        elif a in ("-q", "--quiet"):
            quiet = True
        elif a in ("-o", "--output", "--since", "--until", "-b", "--boot", "-p", "--priority") and nxt is not None \
                and not nxt.startswith("-"):
            i += 1
        i += 1
    lines: list[str] = []
    for name in units:
        lines += tail_lines(Unit(state_dir, name).path("journal", ".log"), n)
    if n is not None:
        lines = lines[-n:] if n > 0 else []
    if not lines:
        if not quiet:
            out("-- No entries --")
        return 0
    out("\n".join(lines))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    state_dir = os.environ.get("FAKE_SYSTEMD_STATE_DIR", "")
    mode = os.path.basename(sys.argv[0]) if argv is None else ""
    rest: list[str] = []
    i = 0
    while i < len(args):
        a = args[i]
        if a == "--state-dir" and i + 1 < len(args) and not rest:
            state_dir = args[i + 1]
            i += 2
            continue
        if a.startswith("--state-dir=") and not rest:
            state_dir = a.split("=", 1)[1]
            i += 1
            continue
        if not rest and a in ("systemctl", "journalctl", "--supervise"):
            mode = a.lstrip("-")
            i += 1
            rest = args[i:]
            break
        rest.append(a)
        i += 1
    if mode not in ("systemctl", "journalctl", "supervise"):
        err("usage: fake_systemd.py --state-dir DIR {systemctl|journalctl} ARGS...")
        return 2
    if not state_dir:
        err("fake_systemd: no state dir (--state-dir DIR or $FAKE_SYSTEMD_STATE_DIR)")
        return 2
    ensure_dirs(state_dir)
    if mode == "supervise":  # internal: the detached supervisor after its re-exec
        key, main_pid, invocation = rest[:3]
        wait_and_record(Unit(state_dir, key), int(main_pid), invocation)
    try:
        if mode == "systemctl":
            return systemctl(state_dir, rest)
        return journalctl(state_dir, rest)
    except BrokenPipeError:
        return 1


if __name__ == "__main__":
    sys.exit(main())
