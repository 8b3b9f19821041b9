/**
 * Where a cascade's time goes, from the agents' own logs (docs/performance.md, "Where the
 * time goes": for any goal missed, the profile that shows where the time goes). The agents
 * run at log level debug; the host broker and runBroker mark their phases (`notice phase`),
 * the guest agent logs its steps at info. Every line carries the epoch-ms `time` of one
 * machine's clock, the same clock the bench reads for the request and the answer, so the
 * phases of one notice are differences of timestamps: no sampling, no instrumentation
 * beyond those lines.
 */
import { readFileSync, readdirSync } from 'node:fs';
import path from 'node:path';
import { summarise, type Summary } from './common';

/** One timed request: the notices it issued (one a guest), sent at `start`, answered at `end`. */
export interface TracedRun {
  ids: string[];
  start: number;
  end: number;
}

/** In cascade order; each phase ends where the next begins. */
export const PHASES = [
  [
    'operator → host journaled',
    'the request on the operator socket, checked against the books, the notice journaled (fsync)',
  ],
  ['host → guest accepted', 'sent on the channel, validated and journaled by the guest agent'],
  ['accepted → plan', "the guest's queue, a fresh usage sample of every project, the pure planner"],
  [
    'plan → notices delivered',
    "every project's notice.json written, delivery recorded in the step journal",
  ],
  [
    'delivered → first stop signal',
    'plan and step records durable, the registry record, cgroup.procs read, the first signal',
  ],
  [
    'first signal → last stopped',
    'signals in rank order, processes exit, groups reported empty (inotify); shrinks beside them',
  ],
  [
    'last stopped → steps done',
    'shrinks still running (memory.max after usage came down), step outcomes journaled',
  ],
  ['steps done → guest outcome', 'the allocation and the outcome journaled'],
  [
    'guest outcome → host has it',
    'the outcome (or its parts) over the channel, journaled by the host',
  ],
  [
    'host has it → operator answered',
    'the VM cgroup lowered (actuation), the record journaled, the reply',
  ],
] as const;

interface Line {
  time: number;
  msg: string;
  noticeId?: string;
  phase?: string;
  name?: string;
}

function readLines(dir: string): Line[] {
  const out: Line[] = [];
  for (const f of readdirSync(dir)) {
    if (!f.endsWith('.log')) continue;
    for (const raw of readFileSync(path.join(dir, f), 'utf8').split('\n')) {
      if (!raw.startsWith('{')) continue;
      try {
        const j = JSON.parse(raw) as Line;
        if (typeof j.time === 'number' && typeof j.noticeId === 'string') out.push(j);
      } catch {
        // A line cut by a kill: not ours to judge here.
      }
    }
  }
  return out;
}

/** Per phase, the p50/p99 over every notice of the traced runs; null when the logs lack marks. */
export function phasesFromLogs(
  logDir: string,
  runs: TracedRun[],
): { phases: { phase: string; what: string; ms: Summary }[]; notices: number } | null {
  const byId = new Map<string, Line[]>();
  for (const l of readLines(logDir)) {
    const list = byId.get(l.noticeId!) ?? [];
    list.push(l);
    byId.set(l.noticeId!, list);
  }
  const samples: number[][] = PHASES.map(() => []);
  let notices = 0;
  for (const run of runs) {
    for (const id of run.ids) {
      const ls = (byId.get(id) ?? []).sort((a, b) => a.time - b.time);
      const host = (p: string) => ls.find((l) => l.name?.endsWith('host') && l.phase === p)?.time;
      const guest = (m: string, p?: string) =>
        ls.filter((l) => l.name?.endsWith('guest') && l.msg === m && (!p || l.phase === p));
      const first = (xs: Line[]) => xs[0]?.time;
      const last = (xs: Line[]) => xs[xs.length - 1]?.time;
      const marks = [
        run.start,
        host('journaled'),
        first(guest('notice accepted and journaled')),
        first(guest('plan')),
        first(guest('notice phase', 'delivered')),
        first(guest('stop signal sent')),
        last(guest('project stopped')),
        first(guest('notice phase', 'steps-done')),
        first(guest('notice done')),
        host('steps-done'),
        run.end,
      ];
      if (marks.some((m) => m === undefined)) continue;
      notices++;
      for (let i = 0; i < PHASES.length; i++) samples[i].push(marks[i + 1]! - marks[i]!);
    }
  }
  if (notices === 0) return null;
  return {
    notices,
    phases: PHASES.map(([phase, what], i) => ({ phase, what, ms: summarise(samples[i]) })),
  };
}
