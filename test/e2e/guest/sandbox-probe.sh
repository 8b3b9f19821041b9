#!/bin/bash
# TEST-ONLY. Run in the guest as ExecStart of a copy of the installed
# nestbroker-guest.service (same Delegate=, KillMode=, capabilities and sandbox): it does
# each thing the guest agent does, and prints "probe STEP ok" or "probe STEP FAIL why".
# guest.e2e.test.ts reads the lines from the journal.
ok() { echo "probe $1 ok"; }
fail() { echo "probe $1 FAIL $2"; }
step() { # step NAME CMD...: CMD must succeed
  local name=$1; shift
  local err
  if err=$("$@" 2>&1); then ok "$name"; else fail "$name" "$err"; fi
}
refused() { # refused NAME CMD...: CMD must fail (the sandbox forbids it)
  local name=$1; shift
  if "$@" 2>/dev/null; then fail "$name" "was allowed"; else ok "$name"; fi
}

P=/sys/fs/cgroup$(cut -d: -f3 /proc/self/cgroup)
echo "probe cgroup $P"
echo "probe caps $(grep -E '^(CapBnd|CapEff|NoNewPrivs)' /proc/self/status | tr -s '\t' ' ' | paste -sd' ')"
# The agent's first move: into its own leaf, so that its cgroup has no processes and
# controllers can be enabled for the subtree (cgroup-v2.rst "No Internal Process Constraint").
step leaf bash -c "mkdir $P/agent && echo $$ >$P/agent/cgroup.procs"
step subtree-control bash -c "echo '+memory +cpu +pids +cpuset' >$P/cgroup.subtree_control"
step project-mkdir bash -c "mkdir $P/projects && echo '+memory +cpu +pids' >$P/projects/cgroup.subtree_control && mkdir $P/projects/demo"
step memory.max bash -c "echo 67108864 >$P/projects/demo/memory.max && [ \$(cat $P/projects/demo/memory.max) = 67108864 ]"
step memory.high bash -c "echo 50331648 >$P/projects/demo/memory.high"
step cpu.max bash -c "echo '20000 100000' >$P/projects/demo/cpu.max && [ \"\$(cat $P/projects/demo/cpu.max)\" = '20000 100000' ]"
step pids.max bash -c "echo 64 >$P/projects/demo/pids.max"
# A project started as another user (CAP_SETUID, CAP_SETGID), moved into its cgroup.
setpriv --reuid=65534 --regid=65534 --clear-groups sleep 300 &
PID=$!
step start-as-user bash -c "sleep 0.3; [ \$(stat -c %u /proc/$PID) = 65534 ]"
step move-pid bash -c "echo $PID >$P/projects/demo/cgroup.procs && grep -qx $PID $P/projects/demo/cgroup.procs"
# A project's own cgroup namespace (CAP_SYS_ADMIN), then CAP_SYS_ADMIN and CAP_SETPCAP
# dropped from its bounding set (CAP_SETPCAP) before its program runs: the chain the agent
# execs (cgroup-adapter/spawn.ts). The project cannot unshare again, nor mount.
step cgroupns unshare --cgroup -- setpriv --bounding-set=-sys_admin,-setpcap -- bash -c "grep -qx '0::/' /proc/self/cgroup"
refused project-no-sys-admin unshare --cgroup -- setpriv --bounding-set=-sys_admin,-setpcap -- unshare --cgroup true
# Signalling another user's process: CAP_KILL.
step signal-other-user kill -0 "$PID"
# The project's notice directory handed to its user (CAP_CHOWN), then written by the agent
# (CAP_DAC_OVERRIDE: the directory is no longer root's). chmod BEFORE chown: changing the
# mode of a file root no longer owns needs CAP_FOWNER, which the unit does not grant.
step notice-dir-chown bash -c "mkdir -p /run/nestbroker/guest/projects/probe && chmod 0755 /run/nestbroker/guest/projects/probe && chown 65534:65534 /run/nestbroker/guest/projects/probe"
refused chmod-not-owner chmod 0700 /run/nestbroker/guest/projects/probe
step notice-write bash -c "echo '{}' >/run/nestbroker/guest/projects/probe/notice.json"
step state-write bash -c "mkdir -p /var/lib/nestbroker/guest && echo x >/var/lib/nestbroker/guest/.probe && rm /var/lib/nestbroker/guest/.probe"
step tmp-write bash -c "echo x >/tmp/probe && rm /tmp/probe"
step channel-open bash -c "exec 3<>/dev/virtio-ports/org.nestbroker.0"
step psi-read cat /proc/pressure/memory
step cgroup.kill bash -c "echo 1 >$P/projects/demo/cgroup.kill; for i in \$(seq 50); do grep -q 'populated 0' $P/projects/demo/cgroup.events && exit 0; sleep 0.1; done; exit 1"
step rmdir bash -c "rmdir $P/projects/demo $P/projects"
rm -rf /run/nestbroker/guest/projects/probe
# What the sandbox must refuse.
refused etc-readonly bash -c "echo x >/etc/nestbroker-probe"
refused usr-readonly bash -c "echo x >/usr/local/bin/nestbroker-probe"
# ProtectHome=yes mounts empty mode-000 directories over /home, /root, /run/user (CAP_DAC_OVERRIDE
# can list them, but there is nothing in them).
refused home-hidden bash -c "[ -n \"\$(ls -A /root)\" ]"
# The agent has CAP_SYS_ADMIN (for the namespace) but SystemCallFilter=~@mount: no mount.
refused no-mount mount -t tmpfs none /mnt
refused no-setuid-gain bash -c "[ \$(grep NoNewPrivs /proc/self/status | cut -f2) = 0 ]"
echo "probe done"
