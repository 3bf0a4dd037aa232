"""``nfknock demo``: the whole story in two network namespaces, then cleaned up.

A server namespace runs a TCP service on port 22 behind nfknock's static rules and
the real daemon; a client namespace tries to reach it before and after knocking,
and replays a sniffed sequence.  Only 198.51.100.0/24 and 2001:db8::/64, only
inside the namespaces the demo creates.
"""

from __future__ import annotations

import json
import re
import sys
import tempfile
import time
from pathlib import Path

from nfknock.netlab import CLIENT4, SERVER4, SERVER6, Lab, can_run

GREEN, RED, BOLD, DIM, RESET = "\033[32m", "\033[31m", "\033[1m", "\033[2m", "\033[0m"


class Story:
    def __init__(self, color: bool) -> None:
        self.color = color
        self.n = 0
        self.failures = 0

    def c(self, code: str, text: str) -> str:
        return f"{code}{text}{RESET}" if self.color else text

    def step(self, text: str) -> None:
        self.n += 1
        print(f"\n{self.c(BOLD, f'{self.n}. {text}')}", flush=True)

    def say(self, text: str) -> None:
        print(f"   {text}", flush=True)

    def expect(self, what: str, got: str, want: str) -> None:
        ok = got == want
        self.failures += not ok
        mark = self.c(GREEN, "as expected") if ok else self.c(RED, f"UNEXPECTED (wanted {want})")
        print(f"   {what}: {self.c(BOLD, got)} -- {mark}", flush=True)

    def log(self, lab: Lab, since: int, kinds: set[str]) -> int:
        lines = lab.log_text().splitlines()
        for line in lines[since:]:
            try:
                e = json.loads(line)
            except ValueError:
                continue
            if e.get("event") in kinds:
                detail = " ".join(
                    f"{k}={e[k]}" for k in ("src", "user", "port", "reason") if k in e
                )
                self.say(self.c(DIM, f"daemon log: {e['event']} {detail}"))
        return len(lines)


def run_demo() -> int:
    why = can_run()
    if why is not None:
        print(f"nfknock demo: cannot run here: {why}", file=sys.stderr)
        return 1
    story = Story(sys.stdout.isatty())
    interesting = {
        "protected_drop",
        "protected_accept",
        "protected_reject",
        "sequence_completed",
        "grant_opened",
        "sequence_stale",
    }
    with tempfile.TemporaryDirectory(prefix="nfknock-demo-") as tmp, Lab(Path(tmp)) as lab:
        work = Path(tmp)
        story.step("Two network namespaces joined by a veth pair")
        story.say(f"client {lab.client}: {CLIENT4}, 2001:db8::10")
        story.say(f"server {lab.server}: {SERVER4}, {SERVER6} -- a TCP service listens on port 22")
        lab.start_service()

        story.step("The admin sets nfknock up on the server")
        cfg = work / "nfknock.toml"
        lab.nfknock(
            "init",
            "--config",
            str(cfg),
            "--state",
            str(work / "state.db"),
            "--socket",
            str(work / "control.sock"),
        )
        cfg.write_text(cfg.read_text().replace('format = "auto"', 'format = "json"'))
        out = lab.nfknock(
            "user", "add", "alice", "--config", str(cfg), "--host", SERVER4, "--profile", "demo"
        ).stdout
        story.say("nfknock init; nfknock user add alice  (a 256-bit secret, printed once)")
        profile = out[out.index("[profiles") : out.index("# or on the command line")].strip()
        lab.install_rules(cfg)
        story.say("nfknock rules --install  (static rules: SYNs to 22 and 1024-33791 -> NFQUEUE)")
        lab.start_daemon(cfg)
        story.say("nfknock run  (the verdict daemon is bound to queue 0)")
        seen = story.log(lab, 0, set())

        story.step("Alice's laptop gets the client profile the admin pasted to her")
        xdg = work / "alice-home"
        (xdg / "nfknock").mkdir(parents=True)
        (xdg / "nfknock" / "client.toml").write_text(profile + "\n")
        (xdg / "nfknock" / "client.toml").chmod(0o600)
        env = {"XDG_CONFIG_HOME": str(xdg), "XDG_STATE_HOME": str(work / "alice-state")}
        masked = re.sub(r'secret = "(.{4}).*"', r'secret = "\1…"', profile)
        for line in masked.splitlines():
            story.say(story.c(DIM, line))

        story.step("Someone connects to port 22 without knocking")
        story.expect("connect 198.51.100.1:22", lab.probe(SERVER4)["result"], "timeout")
        story.say("the SYN was dropped silently: no reset, the port looks like nothing is there")
        seen = story.log(lab, seen, interesting)

        if time.time() % 30 > 27:
            time.sleep(3.2)  # keep knock and replay in one 30 s step, for a clear story
        story.step("Alice knocks: 32 SYNs to ports derived from her secret and the time")
        seq = json.loads(
            lab.client_cmd("sequence", "--profile", "demo", "--json", env=env).stdout or "{}"
        )
        ports = seq.get("ports", [])
        story.say(f"nfknock-client sequence --profile demo: {' '.join(map(str, ports[:8]))} …")
        t0 = time.monotonic()
        proc = lab.client_cmd("knock", "--profile", "demo", "--check", "--json", env=env)
        took = (time.monotonic() - t0) * 1000
        result = json.loads(proc.stdout.splitlines()[-1]) if proc.stdout else {}
        story.expect(
            "nfknock-client knock --profile demo --check",
            "open" if result.get("ok") else "closed",
            "open",
        )
        story.say(f"knock + connect took {took:.0f} ms (including starting Python)")
        seen = story.log(lab, seen, interesting)

        story.step("The door admitted one connection; the next one is dropped again")
        story.expect("connect again", lab.probe(SERVER4)["result"], "timeout")
        seen = story.log(lab, seen, interesting)

        story.step("An eavesdropper replays Alice's 32 knocks from her own address")
        lab.send_knocks(SERVER4, ports)
        story.expect("connect after the replay", lab.probe(SERVER4)["result"], "reset")
        story.say(
            "the sequence's counter is spent: the server answers with a TCP reset "
            "('behind'), and grants nothing"
        )
        seen = story.log(lab, seen, interesting)

        story.step("The eavesdropper replays from another address")
        lab.add_client_address("198.51.100.66/24")
        lab.send_knocks(SERVER4, ports, source="198.51.100.66")
        story.expect(
            "connect from 198.51.100.66",
            lab.probe(SERVER4, source="198.51.100.66")["result"],
            "reset",
        )
        story.say("still nothing opens; the knocks of the next 30 s step are different anyway")
        seen = story.log(lab, seen, interesting)

        story.step("Alice knocks again: her client remembers the counter and gets in")
        proc = lab.client_cmd("knock", "--profile", "demo", "--check", "--json", env=env)
        result = json.loads(proc.stdout.splitlines()[-1]) if proc.stdout else {}
        story.expect("second knock", "open" if result.get("ok") else "closed", "open")
        seen = story.log(lab, seen, interesting)

        story.step("What the daemon reports (nfknock status)")
        for line in lab.nfknock("status", "--config", str(cfg)).stdout.splitlines():
            story.say(line)

        story.step("Cleaning up: daemon stopped, rules removed, namespaces deleted")
        lab.stop_daemon()
        lab.nfknock("rules", "--remove", "--config", str(cfg))
    print()
    if story.failures:
        print(story.c(RED, f"demo finished with {story.failures} unexpected result(s)"))
        return 1
    print(story.c(GREEN, "demo finished: every step behaved as expected"))
    return 0
