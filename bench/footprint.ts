#!/usr/bin/env node
/**
 * What the agents cost (docs/performance.md, part 2).
 *
 * Idle: a host broker with 50 guests connected (guest agents as real processes); one of
 * them, g00, runs 200 projects and samples their usage every second (the agent's default
 * interval), the others 2 projects each. Over --seconds (60): CPU % of one core (utime +
 * stime from /proc/<pid>/stat) and RSS (VmRSS from /proc/<pid>/status) of the host broker
 * and of g00, sampled every second; beside them, in the same window, a bare `node` idling
 * (`node -e 'setInterval(…)'`, no flags) and one with the daemons' own flags
 * (AGENT_NODE_FLAGS), the reference of the guest agent's RSS goal (≤ 1.25× bare node).
 *
 * Notices: then small alternating reclaim/restore notices of CPU only (0.5 CPU of a VM
 * with room to spare, so every project keeps running): g01 gets them back to back, one in
 * flight, and the other small guests share the rest, until the host has handled --notices
 * (10 000) or --notice-seconds ran out. RSS of the host and of g01 is sampled along the
 * way, so growth shows as a slope; when the budget ends first, the figure at 10 000 is
 * extrapolated from that slope and marked as such.
 *
 *   make build && node dist/bench/footprint.js [--seconds 60] [--notices 10000]
 *
 * Options: --guests N (50), --projects N (200 on g00), --notice-seconds S (300),
 * --root NAME, --out FILE, --agents DIST (another build), --node-args=FLAGS.
 */
import { spawn, type ChildProcess } from 'node:child_process';
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { rpcCall } from '../agent/common/rpc';
import type { NoticeView } from '../agent/host/api';
import { AGENT_NODE_FLAGS, NESTBROKER, removeLeftoverRoot } from '../demo/stack';
import {
  fitLine,
  intArg,
  nowMs,
  parseArgs,
  r1,
  r3,
  requireRoot,
  say,
  sleep,
  summarise,
  table,
  writeResult,
} from './lib/common';
import { cpuPercent, sampleProc, type ProcSample } from './lib/procstat';
import { BenchStack } from './lib/stack';

const OPTIONS = {
  seconds: 'idle sampling window, s (default 60)',
  guests: 'guests connected to the host (default 50)',
  projects: 'projects of the sampled guest g00 (default 200)',
  notices: 'notices the host handles after the idle window (default 10000; 0 skips)',
  'notice-seconds': 'time budget for the notices, s (default 300)',
  agents:
    "another build's dist/ whose daemons to measure (default this one's), to compare builds in one harness",
  'node-args':
    "extra node flags of the daemons (and of the flagged bare node), e.g. '--lite-mode', for A/B runs",
  root: 'cgroup root (default nestbroker-bench-<pid>)',
  out: 'JSON file (default bench/results/footprint.json)',
};

const MiB = 2 ** 20;
const GOALS = {
  /** RSS: at most this many times a bare `node`'s, measured in the same window */
  guest: { cpuPercent: 0.5, rssOverBareNode: 1.25 },
  host: { cpuPercent: 2, rssBytes: 60 * MiB },
};

/** An idle `node` that does nothing: what Node itself costs on this machine, now. */
function bareNode(flags: readonly string[]): ChildProcess {
  return spawn(process.execPath, [...flags, '-e', 'setInterval(() => {}, 1 << 30)'], {
    stdio: 'ignore',
  });
}

interface Usage {
  cpuPercent: number;
  rssBytes: { first: number; mean: number; max: number; last: number };
  samples: { t: number; cpuPercent: number; rssBytes: number }[];
}

function usageOver(samples: ProcSample[]): Usage {
  const first = samples[0];
  const last = samples[samples.length - 1];
  const rss = samples.map((s) => s.rssBytes);
  return {
    cpuPercent: r3(cpuPercent(first, last)),
    rssBytes: {
      first: first.rssBytes,
      mean: Math.round(rss.reduce((a, b) => a + b, 0) / rss.length),
      max: Math.max(...rss),
      last: last.rssBytes,
    },
    samples: samples.slice(1).map((s, i) => ({
      t: r1((s.at - first.at) / 1000),
      cpuPercent: r1(cpuPercent(samples[i], s)),
      rssBytes: s.rssBytes,
    })),
  };
}

interface Checkpoint {
  hostNotices: number;
  g01Notices: number;
  elapsedS: number;
  hostRssBytes: number;
  g01RssBytes: number;
  /** notice round trip at this point (g01, the last 50), ms */
  g01NoticeMsP50: number;
}

export async function main(argv = process.argv.slice(2)): Promise<number> {
  const a = parseArgs(argv, OPTIONS);
  requireRoot('bench/footprint');
  const seconds = intArg(a.seconds, 'seconds', 60);
  const nGuests = intArg(a.guests, 'guests', 50, 2);
  const nProjects = intArg(a.projects, 'projects', 200);
  const target = intArg(a.notices, 'notices', 10_000, 0);
  const budgetS = intArg(a['notice-seconds'], 'notice-seconds', 300);
  const root = a.root ?? `nestbroker-bench-${process.pid}`;
  say(
    `footprint: host broker with ${nGuests} guests, g00 with ${nProjects} projects; idle ${seconds} s, then up to ${target} notices in ${budgetS} s; root ${root}`,
  );
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'nestbroker-bench-footprint-'));
  const extra = (a['node-args'] ?? '').split(' ').filter((x) => x !== '');
  const daemonFlags = [...AGENT_NODE_FLAGS, ...extra];
  const program = a.agents ? path.resolve(a.agents, 'agent', 'cli', 'nestbroker.js') : NESTBROKER;
  say(`  daemons: ${program}`);
  const stack = new BenchStack({
    root,
    dir,
    nodeArgs: { host: extra, guest: extra },
    nestbroker: program,
    guests: Array.from({ length: nGuests }, (_, g) => ({
      name: `g${String(g).padStart(2, '0')}`,
      projects: g === 0 ? nProjects : 2,
      // Room for a 0.5 CPU reclaim that leaves every project its maximum.
      cpus: g === 0 ? undefined : os.cpus().length + 1,
    })),
  });
  const onSignal = (): void => {
    void stack
      .teardown()
      .then(() => removeLeftoverRoot(root))
      .finally(() => process.exit(130));
  };
  process.once('SIGINT', onSignal);
  process.once('SIGTERM', onSignal);
  let idle:
    | {
        host: Usage;
        guest: Usage;
        bareNode: Usage;
        bareNodeAgentFlags: Usage;
        agentFlags: readonly string[];
        otherGuestsCpuPercent: number;
      }
    | undefined;
  const bare = [bareNode([]), bareNode(daemonFlags)];
  const checkpoints: Checkpoint[] = [];
  let notices: Record<string, unknown> | undefined;
  try {
    const t0 = nowMs();
    await stack.prepare();
    await stack.startGuests();
    await stack.startHost();
    await stack.waitConnected();
    await stack.waitProjectsRunning();
    const settleS = Math.min(5, seconds);
    say(`  ${nGuests} guests up in ${Math.round((nowMs() - t0) / 1000)} s; settling ${settleS} s`);
    await sleep(settleS * 1000);
    const pids = stack.agentPids();
    const hostPid = pids.host!;
    const g00 = pids.guests.g00!;
    const others = stack.guests.slice(1).map((g) => g.proc!.child.pid!);

    // ---- idle
    const hs: ProcSample[] = [];
    const gs: ProcSample[] = [];
    const bs: ProcSample[][] = [[], []];
    const o0 = others.map(sampleProc);
    for (let i = 0; i <= seconds; i++) {
      hs.push(sampleProc(hostPid));
      gs.push(sampleProc(g00));
      bare.forEach((b, j) => bs[j].push(sampleProc(b.pid!)));
      if (i < seconds) await sleep(1000 - ((performance.now() - hs[0].at) % 1000));
    }
    const o1 = others.map(sampleProc);
    idle = {
      host: usageOver(hs),
      guest: usageOver(gs),
      bareNode: usageOver(bs[0]),
      bareNodeAgentFlags: usageOver(bs[1]),
      agentFlags: daemonFlags,
      otherGuestsCpuPercent: r3(
        o0.reduce((s, x, i) => s + cpuPercent(x, o1[i]), 0) / Math.max(1, others.length),
      ),
    };
    say(
      `  idle ${seconds} s: host ${idle.host.cpuPercent}% CPU, ${r1(idle.host.rssBytes.max / MiB)} MiB; g00 ${idle.guest.cpuPercent}% CPU, ${r1(idle.guest.rssBytes.max / MiB)} MiB`,
    );

    // ---- notices
    if (target > 0) {
      const g01Pid = pids.guests.g01!;
      let hostCount = 0;
      let g01Count = 0;
      const g01Ms: number[] = [];
      const tStart = nowMs();
      const deadline = tStart + budgetS * 1000;
      const hostStart = sampleProc(hostPid);
      const g01Start = sampleProc(g01Pid);
      let stop = false;
      const one = async (guest: string, kind: 'reclaim' | 'restore'): Promise<number> => {
        const t = nowMs();
        const v = (await rpcCall(
          stack.hostSocket,
          kind,
          kind === 'reclaim'
            ? { guest, cpus: 0.5, deadline: '30s', reason: 'bench footprint' }
            : { guest, deadline: '30s' },
          { timeoutMs: 60_000 },
        )) as NoticeView;
        if (v.state !== 'done' || v.outcome?.status !== 'complete')
          throw new Error(
            `${kind} of ${guest} ended ${v.state}: ${JSON.stringify(v.error ?? null)}`,
          );
        if (v.outcome.projects.some((p) => p.action === 'stopped'))
          throw new Error(
            `${kind} of ${guest} stopped a project: the notice was meant to be small`,
          );
        hostCount++;
        if (hostCount >= target || nowMs() > deadline) stop = true;
        return nowMs() - t;
      };
      const loop = async (guests: string[], onDone?: (ms: number) => void): Promise<void> => {
        for (let i = 0; !stop; i++) {
          const guest = guests[Math.floor(i / 2) % guests.length];
          const ms = await one(guest, i % 2 === 0 ? 'reclaim' : 'restore');
          onDone?.(ms);
          // Never leave a guest reclaimed at the end: finish the pair.
          if (stop && i % 2 === 0) await one(guest, 'restore');
        }
      };
      const checkpoint = (): void => {
        const recent = g01Ms.slice(-50);
        checkpoints.push({
          hostNotices: hostCount,
          g01Notices: g01Count,
          elapsedS: r1((nowMs() - tStart) / 1000),
          hostRssBytes: sampleProc(hostPid).rssBytes,
          g01RssBytes: sampleProc(g01Pid).rssBytes,
          g01NoticeMsP50: recent.length ? summarise(recent).p50 : 0,
        });
      };
      checkpoint();
      const ticker = setInterval(checkpoint, 5000);
      // The small guests but g01 in a few parallel lanes; g01 alone, back to back.
      const rest = stack.guests.slice(2).map((g) => g.spec.name);
      const lanes = Math.min(4, rest.length);
      try {
        await Promise.all([
          loop(['g01'], (ms) => {
            g01Count++;
            g01Ms.push(ms);
          }),
          ...Array.from({ length: lanes }, (_, l) => loop(rest.filter((_, i) => i % lanes === l))),
        ]);
      } finally {
        clearInterval(ticker);
      }
      checkpoint();
      const elapsedS = (nowMs() - tStart) / 1000;
      const hostEnd = sampleProc(hostPid);
      const g01End = sampleProc(g01Pid);
      // RSS slope over the second half (after warm-up), bytes per notice.
      const half = checkpoints.slice(Math.floor(checkpoints.length / 2));
      const hostFit = fitLine(
        half.map((c) => c.hostNotices),
        half.map((c) => c.hostRssBytes),
      );
      const g01Fit = fitLine(
        half.map((c) => c.g01Notices),
        half.map((c) => c.g01RssBytes),
      );
      const reached = hostCount >= target;
      const at10k = (fit: { a: number; b: number }, x: number, measured: number): number =>
        x >= target ? measured : Math.round(fit.a + fit.b * target);
      notices = {
        target,
        budgetS,
        reachedTarget: reached,
        hostNotices: hostCount,
        g01Notices: g01Count,
        elapsedS: r1(elapsedS),
        noticesPerSecond: r1(hostCount / elapsedS),
        g01NoticeMs: summarise(g01Ms),
        hostCpuPercentWhileBusy: r1(cpuPercent(hostStart, hostEnd)),
        g01CpuPercentWhileBusy: r1(cpuPercent(g01Start, g01End)),
        host: {
          rssBefore: hostStart.rssBytes,
          rssAfter: hostEnd.rssBytes,
          slopeBytesPerNotice: Math.round(hostFit.b),
          rssAt10000: at10k(hostFit, hostCount, hostEnd.rssBytes),
          rssAt10000Extrapolated: hostCount < target,
        },
        g01: {
          rssBefore: g01Start.rssBytes,
          rssAfter: g01End.rssBytes,
          slopeBytesPerNotice: Math.round(g01Fit.b),
          rssAt10000: at10k(g01Fit, g01Count, g01End.rssBytes),
          rssAt10000Extrapolated: g01Count < target,
        },
        journalFiles: {
          host: (await fs.readdir(path.join(dir, 'host-state', 'notices')).catch(() => [])).length,
        },
        checkpoints,
      };
      say(
        `  notices: host ${hostCount} in ${r1(elapsedS)} s (${r1(hostCount / elapsedS)}/s), g01 ${g01Count} (p50 ${summarise(g01Ms).p50} ms)`,
      );
    }
  } finally {
    for (const b of bare) b.kill('SIGTERM');
    await stack.teardown().catch((err: unknown) => say(`  teardown: ${String(err)}`));
    await removeLeftoverRoot(root).catch(() => undefined);
    await fs.rm(dir, { recursive: true, force: true });
    process.off('SIGINT', onSignal);
    process.off('SIGTERM', onSignal);
  }

  const mib = (b: number): number => r1(b / MiB);
  const i = idle!;
  const guestRssGoal = GOALS.guest.rssOverBareNode * i.bareNode.rssBytes.max;
  const guestOverBare = r3(i.guest.rssBytes.max / i.bareNode.rssBytes.max);
  const guestOverBareFlags = r3(i.guest.rssBytes.max / i.bareNodeAgentFlags.rssBytes.max);
  const guestMet =
    i.guest.cpuPercent <= GOALS.guest.cpuPercent && i.guest.rssBytes.max <= guestRssGoal;
  const hostMet =
    i.host.cpuPercent <= GOALS.host.cpuPercent && i.host.rssBytes.max <= GOALS.host.rssBytes;
  say(`\nidle footprint over ${seconds} s (CPU % of one core; RSS MiB)`);
  say(
    table([
      ['process', 'CPU %', 'RSS mean', 'RSS max', '× bare node', 'goal CPU %', 'goal RSS', 'met'],
      [
        `guest agent g00 (${nProjects} projects, usage every 1 s)`,
        i.guest.cpuPercent,
        mib(i.guest.rssBytes.mean),
        mib(i.guest.rssBytes.max),
        guestOverBare,
        GOALS.guest.cpuPercent,
        `${mib(guestRssGoal)} (${GOALS.guest.rssOverBareNode}× bare)`,
        guestMet ? 'yes' : 'NO',
      ],
      [
        `host broker (${nGuests} guests)`,
        i.host.cpuPercent,
        mib(i.host.rssBytes.mean),
        mib(i.host.rssBytes.max),
        r3(i.host.rssBytes.max / i.bareNode.rssBytes.max),
        GOALS.host.cpuPercent,
        mib(GOALS.host.rssBytes),
        hostMet ? 'yes' : 'NO',
      ],
      [
        'bare node (no flags)',
        i.bareNode.cpuPercent,
        mib(i.bareNode.rssBytes.mean),
        mib(i.bareNode.rssBytes.max),
        1,
        '',
        '',
        '',
      ],
      [
        `bare node (${daemonFlags.join(' ')})`,
        i.bareNodeAgentFlags.cpuPercent,
        mib(i.bareNodeAgentFlags.rssBytes.mean),
        mib(i.bareNodeAgentFlags.rssBytes.max),
        r3(i.bareNodeAgentFlags.rssBytes.max / i.bareNode.rssBytes.max),
        '',
        '',
        '',
      ],
      [`other guest agents (2 projects), mean`, i.otherGuestsCpuPercent, '', '', '', '', '', ''],
    ]),
  );
  if (notices) {
    const n = notices as {
      hostNotices: number;
      g01Notices: number;
      reachedTarget: boolean;
      host: {
        rssBefore: number;
        rssAfter: number;
        slopeBytesPerNotice: number;
        rssAt10000: number;
        rssAt10000Extrapolated: boolean;
      };
      g01: {
        rssBefore: number;
        rssAfter: number;
        slopeBytesPerNotice: number;
        rssAt10000: number;
        rssAt10000Extrapolated: boolean;
      };
    };
    say(`\nRSS under notices (MiB): host handled ${n.hostNotices}, g01 ${n.g01Notices}`);
    say(
      table([
        ['process', 'notices', 'RSS before', 'RSS after', 'bytes/notice', `RSS at ${target}`],
        [
          'host broker',
          n.hostNotices,
          mib(n.host.rssBefore),
          mib(n.host.rssAfter),
          n.host.slopeBytesPerNotice,
          `${mib(n.host.rssAt10000)}${n.host.rssAt10000Extrapolated ? ' (extrapolated)' : ''}`,
        ],
        [
          'guest agent g01',
          n.g01Notices,
          mib(n.g01.rssBefore),
          mib(n.g01.rssAfter),
          n.g01.slopeBytesPerNotice,
          `${mib(n.g01.rssAt10000)}${n.g01.rssAt10000Extrapolated ? ' (extrapolated)' : ''}`,
        ],
      ]),
    );
  }
  const goals = [
    {
      goal: `idle guest agent with ${nProjects} projects: ≤ ${GOALS.guest.cpuPercent} % CPU`,
      measured: `${i.guest.cpuPercent} %`,
      met: i.guest.cpuPercent <= GOALS.guest.cpuPercent,
    },
    {
      goal: `idle guest agent: RSS ≤ ${GOALS.guest.rssOverBareNode}× a bare node measured in the same window`,
      measured: `${mib(i.guest.rssBytes.max)} MiB max = ${guestOverBare}× bare node (${mib(i.bareNode.rssBytes.max)} MiB); ${guestOverBareFlags}× a bare node with the agent's flags`,
      met: i.guest.rssBytes.max <= guestRssGoal,
    },
    {
      goal: `host broker with ${nGuests} guests: ≤ ${GOALS.host.cpuPercent} % CPU`,
      measured: `${i.host.cpuPercent} %`,
      met: i.host.cpuPercent <= GOALS.host.cpuPercent,
    },
    {
      goal: `host broker with ${nGuests} guests: ≤ ${mib(GOALS.host.rssBytes)} MiB RSS`,
      measured: `${mib(i.host.rssBytes.max)} MiB max`,
      met: i.host.rssBytes.max <= GOALS.host.rssBytes,
    },
  ];
  say('\ngoals');
  say(
    table([
      ['goal', 'measured', 'met'],
      ...goals.map((g) => [g.goal, g.measured, g.met ? 'yes' : 'NO']),
    ]),
  );
  const out = writeResult(
    'footprint',
    {
      seconds,
      guests: nGuests,
      projects: nProjects,
      program,
      goalsSet: GOALS,
      idle,
      notices,
      goals,
    },
    a.out,
  );
  say(`\nwrote ${out}`);
  return 0;
}

if (require.main === module) {
  main().then(
    (code) => process.exit(code),
    (err: unknown) => {
      console.error(err instanceof Error ? err.stack : String(err));
      process.exit(1);
    },
  );
}
