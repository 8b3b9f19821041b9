/**
 * `nestctl --guest ...`: the guest agent's operator commands, over its socket
 * (default /run/nestbroker/guest.sock; `--socket` overrides). Tables for people,
 * `--json` for scripts; exit codes in format.ts (EXIT).
 */
import type { Argv } from 'yargs';
import { rpcCall } from '../common/rpc';
import { formatMs } from '../common/units';
import type { Outcome } from '../broker/types';
import type { Plan } from '../guest/planner';
import type { TopView } from '../guest/operator-target';
import { parseTopArgs, topLoop, topOptions } from './top';
import {
  checkChangeFlags,
  cpusText,
  EXIT,
  exitForOutcome,
  fmtBytes,
  fmtCpus,
  fmtLimits,
  fmtTime,
  formatOutcome,
  newestFirst,
  formatProgress,
  processCells,
  formatReload,
  json,
  type ReloadAnswer,
  runCommand,
  stdio,
  table,
  type Io,
} from './format';
import { byCodePoint } from '../common/order';

export type { Io } from './format';

export const DEFAULT_GUEST_SOCKET = '/run/nestbroker/guest.sock';

export interface GlobalArgs {
  socket?: string;
  json?: boolean;
  guest?: boolean;
  timeout?: string;
}

function socketOf(a: GlobalArgs): string {
  return a.socket ?? DEFAULT_GUEST_SOCKET;
}

function run(a: GlobalArgs, io: Io, fn: () => Promise<number>): Promise<void> {
  return runCommand(a, io, fn);
}

const pct = (v: number | null): string => (v === null ? '-' : `${v.toFixed(2)}%`);

/** The guest's `top`: largest memory first (where a reclaim would hurt most). */
export function topText(v: TopView): string {
  const rows = [...v.projects].sort(
    (a, b) => (b.memoryBytes ?? -1) - (a.memoryBytes ?? -1) || byCodePoint(a.name, b.name),
  );
  return [
    `guest ${v.guest} at ${v.at}: allocation ${fmtBytes(v.allocation.memoryBytes)}, ${cpusText(v.allocation.cpus)}; ` +
      `for projects ${fmtBytes(v.projectAllocation.memoryBytes)}, ${cpusText(v.projectAllocation.cpus)}`,
    '',
    table(
      [
        'project',
        'prio',
        'state',
        'memory',
        'max',
        'peak',
        'mem psi10',
        'cpus',
        'cpu max',
        'cpu psi10',
        'throttled',
        'oom kills',
        'pids',
      ],
      rows.map((r) => [
        r.name,
        r.priority,
        r.state,
        fmtBytes(r.memoryBytes),
        fmtBytes(r.limits.memoryMax),
        fmtBytes(r.memoryPeakBytes),
        pct(r.memoryPressure10),
        r.cpus === null ? '-' : fmtCpus(r.cpus),
        fmtCpus(r.limits.cpuMax),
        pct(r.cpuPressure10),
        r.throttledUs === null ? '-' : formatMs(r.throttledUs / 1000),
        r.oomKills ?? '-',
        r.pids ?? '-',
      ]),
    ),
    ...(rows.some((r) => r.processes)
      ? [
          '',
          table(
            ['project', 'pid', 'cpu', 'rss', 'running', 'command'],
            rows.flatMap((r) => (r.processes ?? []).map((p) => [r.name, ...processCells(p)])),
          ),
        ]
      : []),
  ].join('\n');
}

function changeArgs(a: Record<string, unknown>): Record<string, unknown> {
  const out: Record<string, unknown> = {};
  for (const k of ['memory', 'cpus', 'deadline', 'reason']) if (a[k] !== undefined) out[k] = a[k];
  return out;
}

interface ProjectRow {
  name: string;
  priority: number;
  state: string;
  stoppedForRoom: boolean;
  stoppedByOperator?: boolean;
  limits: import('../broker/types').ProjectLimits;
  usage: { memoryBytes: number; cpus?: number; pids: number } | null;
  pids: number;
}

function changeOptions<T extends GlobalArgs>(y: Argv<T>) {
  return y
    .option('memory', {
      type: 'string',
      describe: 'memory that goes away / comes back: bytes, 512MiB, 2G',
    })
    .option('cpus', { type: 'string', describe: 'CPUs that go away / come back, e.g. 1 or 0.5' })
    .option('deadline', {
      type: 'string',
      describe: 'when the resources go, from now: 30s, 2m (default 30s)',
    })
    .option('reason', { type: 'string', describe: 'why, for the logs and the projects' });
}

/** Registers the guest commands on a yargs instance. */
export function registerGuestCommands(y: Argv<GlobalArgs>, io: Io = stdio): Argv<GlobalArgs> {
  return y
    .command(
      'projects',
      'the projects: priority, state, limits, usage from the cgroup files, pids',
      (b) => b,
      (a) =>
        run(a, io, async () => {
          const rows = (await rpcCall(socketOf(a), 'projects', {})) as ProjectRow[];
          if (a.json) io.out(json(rows));
          else
            io.out(
              table(
                ['name', 'priority', 'state', 'limits', 'memory', 'cpus', 'pids'],
                rows.map((r) => [
                  r.name,
                  r.priority,
                  r.state +
                    (r.stoppedByOperator && r.state === 'stopped'
                      ? ' (by operator)'
                      : r.stoppedForRoom && r.state === 'stopped'
                        ? ' (for room)'
                        : ''),
                  fmtLimits(r.limits),
                  fmtBytes(r.usage?.memoryBytes),
                  fmtCpus(r.usage?.cpus),
                  r.pids,
                ]),
              ),
            );
          return EXIT.OK;
        }),
    )
    .command(
      'top',
      'the projects as the kernel shows them now, refreshed: memory, peak, pressure, CPUs, OOM kills',
      (b) =>
        topOptions(b).option('processes', {
          type: 'boolean',
          describe: "each project's processes: CPU over the interval and RSS",
        }),
      (a) =>
        run(a, io, async () => {
          const t = parseTopArgs(a);
          return topLoop(
            io,
            { ...t, json: a.json === true, tty: process.stdout.isTTY === true },
            async () =>
              (await rpcCall(socketOf(a), 'top', { processes: a.processes === true })) as TopView,
            topText,
          );
        }),
    )
    .command(
      'plan',
      'dry run: what a reclaim (or --restore) would do to each project, and why; changes nothing',
      (b) =>
        changeOptions(b).option('restore', {
          type: 'boolean',
          describe: 'plan resources coming back',
        }),
      (a) =>
        run(a, io, async () => {
          const r = (await rpcCall(socketOf(a), 'plan', {
            ...changeArgs(a),
            kind: a.restore ? 'restore' : 'reclaim',
          })) as { allocation: { memoryBytes: number; cpus: number }; plan: Plan };
          if (a.json) io.out(json(r));
          else {
            io.out(
              table(
                ['order', 'project', 'action', 'before', 'after', 'why'],
                r.plan.decisions.map((d) => [
                  d.order,
                  d.project,
                  d.action,
                  fmtLimits(d.before),
                  d.action === 'stopped' ? 'stopped' : fmtLimits(d.after),
                  d.reason,
                ]),
              ),
            );
            io.out('');
            io.out(
              `guest allocation after: ${fmtBytes(r.allocation.memoryBytes)} memory, ${cpusText(r.allocation.cpus)}`,
            );
            for (const line of r.plan.reasons) io.out(`- ${line}`);
            io.out('(dry run: nothing was changed)');
          }
          return EXIT.OK;
        }),
    )
    .command(
      'reclaim',
      'take memory/CPUs from this guest now: project notices, shrinks, graceful stops',
      (b) => changeOptions(b),
      (a) => noticeCommand('reclaim', a, io),
    )
    .command(
      'restore',
      'give memory/CPUs back: limits raised, projects stopped for room started again',
      (b) => changeOptions(b),
      (a) => noticeCommand('restore', a, io),
    )
    .command(
      'notices',
      'the notices this guest received (from the host or an operator), newest first',
      (b) => b,
      (a) =>
        run(a, io, async () => {
          const rows = (await rpcCall(socketOf(a), 'notices', {})) as {
            id: string;
            kind: string;
            source: string;
            seq: number;
            state: string;
            status: string | null;
            receivedAt: string;
            runs: number;
            change: { memoryBytes: number; cpus: number };
            outcome: Outcome | null;
            reason: string;
          }[];
          if (a.json) io.out(json(rows));
          else
            io.out(
              table(
                [
                  'id',
                  'kind',
                  'from',
                  'seq',
                  'state',
                  'status',
                  'change',
                  'received',
                  'took',
                  'reason',
                ],
                // Newest first, times as the host's `notices` prints them (format.ts).
                newestFirst(
                  rows,
                  (r) => r.receivedAt,
                  (r) => r.id,
                ).map((r) => [
                  r.id,
                  r.kind,
                  r.source,
                  r.seq,
                  r.state,
                  r.status ?? '-',
                  `${fmtBytes(r.change.memoryBytes)}, ${cpusText(r.change.cpus)}`,
                  fmtTime(r.receivedAt),
                  r.outcome ? formatMs(r.outcome.ms) : '-',
                  r.reason,
                ]),
              ),
            );
          return EXIT.OK;
        }),
    )
    .command(
      'stop <project>',
      'stop one project now (pre-stop hook, stop signal, grace, kill); it stays stopped, across agent restarts and restores, until `start`',
      (b) => b.positional('project', { type: 'string', demandOption: true }),
      (a) =>
        run(a, io, async () => {
          const r = (await rpcCall(
            socketOf(a),
            'stop',
            { project: a.project },
            { timeoutMs: 0 },
          )) as { project: string; exit: string; ms: number; reason: string; escaped?: number[] };
          io.out(
            a.json
              ? json(r)
              : `project ${r.project}: stopped, ${r.exit} in ${formatMs(r.ms)} (${r.reason}); stays stopped until: nestctl --guest start ${r.project}`,
          );
          return EXIT.OK;
        }),
    )
    .command(
      'start <project>',
      'start a project an operator stopped, or one whose restart policy gave up',
      (b) => b.positional('project', { type: 'string', demandOption: true }),
      (a) =>
        run(a, io, async () => {
          const r = (await rpcCall(socketOf(a), 'start', { project: a.project })) as {
            project: string;
            started: boolean;
            state: string;
          };
          io.out(
            a.json
              ? json(r)
              : `project ${r.project}: ${r.started ? 'started' : 'was already running'}`,
          );
          return EXIT.OK;
        }),
    )
    .command(
      'cancel <noticeId>',
      'withdraw a notice whose work has not started',
      (b) => b.positional('noticeId', { type: 'string', demandOption: true }),
      (a) =>
        run(a, io, async () => {
          const r = (await rpcCall(socketOf(a), 'cancel', { noticeId: a.noticeId })) as {
            state: string;
          };
          io.out(a.json ? json(r) : `notice ${String(a.noticeId)}: ${r.state}`);
          return r.state === 'cancelled' ? EXIT.OK : EXIT.REJECTED;
        }),
    )
    .command(
      'reload',
      "re-read the agent's config file and apply what can change live (as SIGHUP does)",
      (b) => b,
      (a) =>
        run(a, io, async () => {
          const r = (await rpcCall(socketOf(a), 'reload', {}, { timeoutMs: 0 })) as ReloadAnswer;
          const f = formatReload(r);
          io.out(a.json ? json(r) : f.text);
          return f.code;
        }),
    )
    .command(
      'status',
      'the guest agent: allocation, reserve, cgroup driver, upstream, notices',
      (b) => b,
      (a) =>
        run(a, io, async () => {
          const r = (await rpcCall(socketOf(a), 'status', {})) as Record<string, unknown>;
          if (a.json) io.out(json(r));
          else
            for (const [k, v] of Object.entries(r))
              io.out(`${k.padEnd(18)} ${typeof v === 'object' ? JSON.stringify(v) : String(v)}`);
          return EXIT.OK;
        }),
    );
}

async function noticeCommand(
  kind: 'reclaim' | 'restore',
  a: GlobalArgs & Record<string, unknown>,
  io: Io,
): Promise<void> {
  await run(a, io, async () => {
    checkChangeFlags(a);
    const r = (await rpcCall(socketOf(a), kind, changeArgs(a), {
      // Long waits show progress; the notice's own deadline bounds the wait (plus slack).
      timeoutMs: 0,
      onProgress: (ev) => {
        if (a.json) return;
        const line = formatProgress(ev as Record<string, unknown>);
        if (line) io.err(line);
      },
    })) as { outcome: Outcome };
    io.out(a.json ? json(r) : formatOutcome(r.outcome, kind));
    return exitForOutcome(r.outcome);
  });
}
