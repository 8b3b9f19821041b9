/**
 * `nestctl <command>`: the host broker's operator commands over its socket
 * (default /run/nestbroker/host.sock; `--socket` overrides). Tables for people, `--json`
 * for scripts. Exit codes: format.ts EXIT, plus HOST_EXIT below (docs/host-broker.md).
 */
import type { Argv } from 'yargs';
import { rpcCall } from '../common/rpc';
import { isNestError, type Problem } from '../common/errors';
import { formatMs, parseDuration } from '../common/units';
import type { NoticeView } from '../host/api';
import type { TriggerView } from '../host/watcher';
import type { GuestStatus, HostProgress } from '../host/host-broker';
import { DEFAULT_HOST_SOCKET } from '../host/config';
import type { PlanResult } from '../protocol/messages';
import type { HostInventory } from '../../cgroup-adapter/host-usage';
import type { VmProcesses } from '../host/watcher';
import { parseTopArgs, topLoop, topOptions } from './top';
import {
  checkChangeFlags,
  cpusText,
  EXIT,
  exitForError,
  exitForOutcome,
  fmtBytes,
  fmtLimits,
  fmtTime,
  formatOutcome,
  formatReload,
  newestFirst,
  processCells,
  type ReloadAnswer,
  json,
  runCommand,
  stdio,
  table,
  type Io,
} from './format';

export type { Io } from './format';

/** Exit codes only host commands give (after format.ts's 0–6). */
export const HOST_EXIT = {
  /** The guest sent no outcome by the deadline (GUEST_LATE); nothing was removed unless --force. */
  LATE: 7,
  /** The notice was cancelled before it was carried out. */
  CANCELLED: 8,
  /** The guest answered, but the VM's limits or balloon could not be set (see the table). */
  ACTUATION: 9,
} as const;

export const HOST_EXIT_HELP = `Host exit codes (besides 0-6):
  ${HOST_EXIT.LATE}  the guest was late (no outcome by the deadline); nothing removed unless --force
  ${HOST_EXIT.CANCELLED}  the notice was cancelled
  ${HOST_EXIT.ACTUATION}  the guest answered but the VM could not be lowered or raised (cgroup, balloon; libvirt: partial or failed)`;

interface G {
  socket?: string;
  json?: boolean;
}

const sock = (a: G): string => a.socket ?? DEFAULT_HOST_SOCKET;

/** The exit code of a host command that failed with `err` (docs/errors.md lists each). */
export function exitForHostError(err: unknown): number {
  if (isNestError(err, 'GUEST_UNKNOWN')) return EXIT.USAGE;
  if (isNestError(err, 'GUEST_LATE')) return HOST_EXIT.LATE;
  return exitForError(err);
}

function run(a: G, io: Io, fn: () => Promise<number>): Promise<void> {
  return runCommand(a, io, fn, exitForHostError);
}

export function exitForNotice(n: NoticeView): number {
  if (n.state === 'cancelled') return HOST_EXIT.CANCELLED;
  if (n.state === 'late' || n.late) return HOST_EXIT.LATE;
  if (n.state === 'refused') return EXIT.REJECTED;
  if (n.state === 'partial' || n.state === 'failed') return HOST_EXIT.ACTUATION;
  if (n.actuation && n.actuation.errors.length > 0) return HOST_EXIT.ACTUATION;
  if (n.outcome) return exitForOutcome(n.outcome);
  return n.state === 'done' ? EXIT.OK : EXIT.ERROR;
}

const res = (r: { memoryBytes: number; cpus: number } | undefined): string =>
  r ? `${fmtBytes(r.memoryBytes)}, ${cpusText(r.cpus)}` : '-';

/** What the host's `status` returns (agent/host/api.ts). */
interface HostStatus {
  inventory?: HostInventory | null;
  processes?: VmProcesses[];
  guests: GuestStatus[];
  notices: NoticeView[];
  host: {
    host: {
      memoryAvailableBytes?: number;
      memoryTotalBytes?: number;
      memoryPsiSomeAvg10?: number;
    };
    vms: {
      guest: string;
      usage?: { memoryCurrent: number; pids: number };
      limits?: {
        memory?: { max?: number | 'max' };
        cpu?: { max?: { quotaUs: number | 'max'; periodUs: number } };
      };
    }[];
  } | null;
  trigger: TriggerView | null;
}

/** A configured duration as it would be written in the config: `500ms`, `30s`, `2m`, `1h`. */
function fmtDuration(ms: number): string {
  for (const [unit, n] of [
    ['h', 3_600_000],
    ['m', 60_000],
    ['s', 1000],
  ] as const)
    if (ms >= n && ms % n === 0) return `${ms / n}${unit}`;
  return `${ms}ms`;
}

/**
 * The automatic trigger for people: what makes it fire, the breach now, the last fire,
 * the last decision and the guests it passed over (docs/host-broker.md).
 */
export function triggerText(t: TriggerView | null): string[] {
  if (!t) return [];
  const th = t.thresholds;
  const when = [
    th.memoryAvailableBelowBytes !== null
      ? `host MemAvailable < ${fmtBytes(th.memoryAvailableBelowBytes)}`
      : '',
    th.memoryPsiAbove !== null ? `memory PSI some avg10 > ${th.memoryPsiAbove}%` : '',
  ].filter(Boolean);
  const out = [
    `trigger: ${t.enabled ? 'on' : 'off'}; fires when ${when.length ? when.join(' or ') : '(no threshold set)'} for ${fmtDuration(th.forMs)}; step ${res(th.step)}, deadline ${fmtDuration(th.deadlineMs)}, cooldown ${fmtDuration(th.cooldownMs)}, looks every ${fmtDuration(th.intervalMs)}`,
  ];
  if (!t.enabled) return out;
  out.push(
    `  breach:     ${t.breachSince ? `since ${fmtTime(t.breachSince)} (for ${formatMs(t.breachForMs ?? 0)}; ${formatMs(t.breachCountedMs ?? 0)} of the ${fmtDuration(th.forMs)} a step needs counted since the last fire)` : 'none now'}`,
  );
  out.push(
    `  last fire:  ${t.lastFire ? `${fmtTime(t.lastFire.at)} (${formatMs(t.lastFire.agoMs)} ago): ${res(t.lastFire.change)} from ${t.lastFire.guest}; ${t.lastFire.reason}` : 'never'}` +
      (t.cooldownLeftMs > 0 ? `; cooling down for ${formatMs(t.cooldownLeftMs)} more` : ''),
  );
  const d = t.decision;
  out.push(
    `  decision:   ${d.fire ? `reclaim ${res(d.change)} from ${d.guest} (${d.reason})` : d.why}${t.decidedAt ? ` (at ${fmtTime(t.decidedAt)})` : ''}`,
  );
  const gb = t.giveBack;
  if (gb) {
    const band = [
      gb.memoryAvailableAboveBytes !== null
        ? `MemAvailable ≥ ${fmtBytes(gb.memoryAvailableAboveBytes)}`
        : '',
      gb.memoryPsiBelow !== null ? `memory PSI some avg10 < ${gb.memoryPsiBelow}%` : '',
    ].filter(Boolean);
    out.push(
      `  give-back:  when ${band.join(' and ')} for ${fmtDuration(gb.afterMs)}: ${gb.clearSince ? `clear since ${fmtTime(gb.clearSince)} (${formatMs(gb.clearForMs ?? 0)})` : 'not clear now'}; last ${gb.last ? `${fmtTime(gb.last.at)}: ${res(gb.last.change)} to ${gb.last.guest}` : 'never'}` +
        (gb.decision
          ? `; ${gb.decision.give ? `giving ${res(gb.decision.change)} to ${gb.decision.guest}` : gb.decision.why}`
          : ''),
    );
  }
  const skipped = Object.entries(t.skippedUnreachable);
  if (skipped.length)
    out.push(`  passed over (not connected): ${skipped.map(([g, n]) => `${g} ${n}×`).join(', ')}`);
  return out;
}

/** `status` (and each refresh of `top`) for people. */
export function statusText(s: HostStatus): string {
  const out: string[] = [];
  const h = s.host?.host;
  out.push(
    `host: ${h ? `${fmtBytes(h.memoryAvailableBytes)} available of ${fmtBytes(h.memoryTotalBytes)}, memory PSI some avg10 ${h.memoryPsiSomeAvg10 ?? '-'}` : 'not sampled yet'}; trigger ${s.trigger?.enabled ? 'on' : 'off'}`,
  );
  const inv = s.inventory;
  if (inv)
    out.push(
      `machine ${inv.hostname}: ${inv.cpuModel}, ${inv.cpus} CPUs (${inv.physicalCores} cores${inv.cpuGHz ? `, ${inv.cpuGHz} GHz` : ''}), ${fmtBytes(inv.memTotalBytes)}; ${inv.os}, kernel ${inv.kernel}, ${inv.arch}`,
    );
  out.push(...triggerText(s.trigger));
  out.push('');
  out.push(guestsTable(s.guests));
  if (s.host?.vms.length) {
    out.push('');
    out.push(
      table(
        ['guest', 'vm memory', 'vm memory limit', 'vm cpu.max', 'pids'],
        s.host.vms.map((v) => [
          v.guest,
          fmtBytes(v.usage?.memoryCurrent),
          fmtBytes(v.limits?.memory?.max),
          v.limits?.cpu?.max ? `${v.limits.cpu.max.quotaUs} ${v.limits.cpu.max.periodUs}` : '-',
          v.usage ? v.usage.pids : '-',
        ]),
      ),
    );
  }
  if (s.processes) {
    out.push('');
    out.push(processesTable(s.processes));
  }
  if (s.notices.length) {
    out.push('');
    out.push(noticesTable(s.notices));
  }
  return out.join('\n');
}

/** Each VM's processes (its QEMU), largest RSS first: CPU share since the last look, RSS. */
export function processesTable(vms: VmProcesses[]): string {
  const rows: (string | number)[][] = [];
  for (const v of vms) {
    if (v.error) rows.push([v.guest, '-', '-', '-', '-', `(${v.error})`]);
    else if (v.processes.length === 0)
      rows.push([v.guest, '-', '-', '-', '-', v.group ? '(no process)' : '(no cgroup configured)']);
    for (const p of v.processes) rows.push([v.guest, ...processCells(p)]);
  }
  return table(['guest', 'pid', 'cpu', 'rss', 'running', 'command'], rows);
}

function guestsTable(gs: GuestStatus[]): string {
  // With libvirt, a column of what libvirt says now (docs/libvirt.md).
  const libvirt = gs.some((g) => g.domain);
  return table(
    [
      'guest',
      'prio',
      'connected',
      'granted',
      'allocation',
      'floor',
      'projects',
      'pending',
      ...(libvirt ? ['libvirt'] : []),
    ],
    gs.map((g) => [
      g.name,
      g.priority,
      g.connected ? 'yes' : 'no',
      res(g.books.granted),
      res(g.books.allocation),
      res(g.books.floor),
      g.inventory ? String(g.inventory.projects.length) : '-',
      g.pending.length ? g.pending.join(',') : '-',
      ...(libvirt ? [domainText(g.domain)] : []),
    ]),
  );
}

function domainText(d: GuestStatus['domain']): string {
  if (!d) return '-';
  if (d.cpus === undefined || d.memoryBytes === undefined) return `${d.name}: ${d.state}`;
  const vcpus = d.vcpus ? ` (${d.vcpus.current}/${d.vcpus.max} vCPUs)` : '';
  return `${d.name}: ${d.state}, ${fmtBytes(d.memoryBytes)}, ${cpusText(d.cpus)}${vcpus}`;
}

/** Newest first, times as the guest's `notices` prints them (format.ts fmtTime). */
function noticesTable(ns: NoticeView[]): string {
  return table(
    [
      'id',
      'kind',
      'from',
      'state',
      'change',
      'allocation',
      'issued',
      'deadline',
      'outcome',
      'reason',
    ],
    newestFirst(
      ns,
      (n) => n.issuedAt,
      (n) => n.id,
    ).map((n) => [
      n.id,
      n.kind,
      n.source,
      n.late && n.state !== 'late' ? `${n.state} (late)` : n.state,
      res(n.change),
      res(n.allocation),
      fmtTime(n.issuedAt),
      fmtTime(n.deadline),
      n.outcome ? `${n.outcome.status} in ${formatMs(n.outcome.ms)}` : (n.error?.code ?? '-'),
      n.reason,
    ]),
  );
}

export function formatNotice(n: NoticeView): string {
  const lines: string[] = [];
  if (n.outcome)
    lines.push(formatOutcome(n.outcome, n.kind === 'restore' ? 'restore' : 'reclaim'), '');
  lines.push(
    `notice ${n.id} (${n.kind} of ${res(n.change)} ${n.kind === 'reclaim' ? 'from' : 'to'} ${n.guest}): ${n.state}${n.late ? ' (guest late)' : ''}`,
  );
  if (n.actuation) {
    const a = n.actuation;
    const mem = a.cgroup?.after.memory?.max;
    const cpu = a.cgroup?.after.cpu?.max;
    lines.push(
      `VM ${a.direction === 'down' ? 'lowered' : 'raised'} to ${res(a.target)}` +
        (a.cgroup
          ? `; cgroup ${a.cgroup.group}: memory ${fmtBytes(mem ?? 'max')}, cpu.max ${cpu ? `${cpu.quotaUs} ${cpu.periodUs}` : '-'}`
          : '') +
        (a.balloon
          ? `; balloon ${fmtBytes(a.balloon.actualBytes)} of ${fmtBytes(a.balloon.targetBytes)}${a.balloon.reached ? '' : ' (short)'}`
          : ''),
    );
    for (const e of a.errors) lines.push(`  ${e.step} failed (${e.code}): ${e.message}`);
  }
  if (n.error) lines.push(`${n.error.code}: ${n.error.message}`);
  return lines.join('\n');
}

export function formatHostProgress(ev: HostProgress): string {
  const t = ev.at.slice(11, 23);
  if (ev.project)
    return `${t}  ${ev.guest}/${ev.project}: ${ev.phase}${ev.exit ? `, ${ev.exit}` : ''}${ev.ms !== undefined ? ` (${formatMs(ev.ms)})` : ''}`;
  return `${t}  ${ev.guest}: ${ev.phase}`;
}

function changeOpts<T>(y: Argv<T>, required: boolean) {
  return y
    .positional('vm', { type: 'string', demandOption: true, describe: 'guest (VM) name' })
    .option('memory', {
      type: 'string',
      describe: `memory to ${required ? 'take' : 'give back'}: 2GiB, 512M, bytes`,
    })
    .option('cpus', { type: 'string', describe: 'CPUs, e.g. 1 or 0.5' });
}

function changeArgs(a: Record<string, unknown>): Record<string, unknown> {
  // The guest is the positional `vm`: `--guest` is nestctl's global switch (nestctl.ts).
  const out: Record<string, unknown> = { guest: a.vm };
  for (const k of ['memory', 'cpus', 'deadline', 'reason', 'force'])
    if (a[k] !== undefined) out[k] = a[k];
  return out;
}

function noticeCommand(kind: 'reclaim' | 'restore', io: Io) {
  return async (a: G & Record<string, unknown>): Promise<void> =>
    run(a, io, async () => {
      checkChangeFlags(a);
      const d = parseDuration(a.deadline ?? '60s');
      // Wait for the deadline, the actuation after it (a balloon may take a while), and slack.
      const timeoutMs = d.ok ? d.value + 120_000 : 0;
      const n = (await rpcCall(sock(a), kind, changeArgs(a), {
        timeoutMs,
        onProgress: (ev) => {
          if (!a.json) io.out(formatHostProgress(ev as HostProgress));
        },
      })) as NoticeView;
      io.out(a.json ? json(n) : `\n${formatNotice(n)}`);
      return exitForNotice(n);
    });
}

export function registerHostCommands(y: Argv, io: Io = stdio): Argv {
  return y
    .command(
      'guests',
      'list the guests: connection, books (granted / allocation / floor), pending notices',
      (c) => c,
      (a) =>
        run(a as G, io, async () => {
          const gs = (await rpcCall(sock(a as G), 'guests')) as GuestStatus[];
          io.out((a as G).json ? json(gs) : guestsTable(gs));
          return EXIT.OK;
        }),
    )
    .command(
      'status',
      'the host: inventory, guests, notices in flight, host memory, VM cgroups, trigger state',
      (c) =>
        c.option('processes', {
          type: 'boolean',
          describe: "each VM's processes (its QEMU): CPU and RSS",
        }),
      (a) =>
        run(a as G, io, async () => {
          const s = (await rpcCall(sock(a as G), 'status', {
            processes: a.processes === true,
          })) as HostStatus;
          io.out((a as G).json ? json(s) : statusText(s));
          return EXIT.OK;
        }),
    )
    .command(
      'reload',
      "re-read the broker's config file and apply what can change live (as SIGHUP does)",
      (c) => c,
      (a) =>
        run(a as G, io, async () => {
          const r = (await rpcCall(sock(a as G), 'reload', {}, { timeoutMs: 0 })) as ReloadAnswer;
          const f = formatReload(r);
          io.out((a as G).json ? json(r) : f.text);
          return f.code;
        }),
    )
    .command(
      'top',
      'the host status, refreshed: host memory and pressure, guests, VM cgroups, notices',
      (c) =>
        topOptions(c).option('processes', {
          type: 'boolean',
          describe: "each VM's processes (its QEMU): CPU over the interval and RSS",
        }),
      (a) =>
        run(a as G, io, async () => {
          const t = parseTopArgs(a);
          return topLoop(
            io,
            { ...t, json: (a as G).json === true, tty: process.stdout.isTTY === true },
            async () =>
              (await rpcCall(sock(a as G), 'status', {
                processes: a.processes === true,
              })) as HostStatus,
            statusText,
          );
        }),
    )
    .command(
      'projects <vm>',
      "a guest's projects, from its last hello",
      (c) =>
        c.positional('vm', { type: 'string', demandOption: true, describe: 'guest (VM) name' }),
      (a) =>
        run(a as G, io, async () => {
          const p = (await rpcCall(sock(a as G), 'projects', { guest: a.vm })) as {
            guest: string;
            connected: boolean;
            helloAt: string;
            cpus: number;
            memoryBytes: number;
            projects: { name: string; priority: number; state: string }[];
          };
          if ((a as G).json) io.out(json(p));
          else {
            io.out(
              `${p.guest}: ${fmtBytes(p.memoryBytes)}, ${cpusText(p.cpus)}; ${p.connected ? 'connected' : 'NOT connected'}; inventory of ${p.helloAt}`,
            );
            io.out(
              table(
                ['project', 'priority', 'state'],
                p.projects.map((x) => [x.name, x.priority, x.state]),
              ),
            );
          }
          return EXIT.OK;
        }),
    )
    .command(
      'plan <vm>',
      'dry run: what a reclaim would leave the guest, checked against its books and floor',
      (c) => changeOpts(c, true),
      (a) =>
        run(a as G, io, async () => {
          const p = (await rpcCall(sock(a as G), 'plan', changeArgs(a))) as {
            ok: boolean;
            allocation?: { memoryBytes: number; cpus: number };
            books: {
              granted: { memoryBytes: number; cpus: number };
              floor: { memoryBytes: number; cpus: number };
            };
            problems: Problem[];
            code?: string;
            inventory: { projects: { name: string; priority: number; state: string }[] } | null;
            guestPlan: PlanResult | null;
            note?: string;
          };
          if ((a as G).json) io.out(json(p));
          else io.out(hostPlanText(String(a.vm), p));
          return p.ok ? EXIT.OK : EXIT.REJECTED;
        }),
    )
    .command(
      'reclaim <vm>',
      'take memory/CPUs from a guest: notice → guest cascade → outcome → VM limits lowered',
      (c) =>
        changeOpts(c, true)
          .option('deadline', {
            type: 'string',
            default: '60s',
            describe: 'time the guest has: 30s, 2m',
          })
          .option('force', {
            type: 'boolean',
            default: false,
            describe: 'remove the resources at the deadline even if the guest is late',
          })
          .option('reason', { type: 'string', describe: 'said to the guest and its projects' })
          .example('$0 reclaim vm1 --memory 2GiB --cpus 1 --deadline 60s --reason maintenance', ''),
      (a) => noticeCommand('reclaim', io)(a as G & Record<string, unknown>),
    )
    .command(
      'restore <vm>',
      'give resources back: VM limits raised first, then the guest is told (default: all taken)',
      (c) =>
        changeOpts(c, false)
          .option('deadline', {
            type: 'string',
            default: '60s',
            describe: 'time the guest has to answer',
          })
          .option('reason', { type: 'string' }),
      (a) => noticeCommand('restore', io)(a as G & Record<string, unknown>),
    )
    .command(
      'cancel <id>',
      'withdraw a reclaim before its deadline (the guest must agree it has not carried it out)',
      (c) => c.positional('id', { type: 'string', demandOption: true }),
      (a) =>
        run(a as G, io, async () => {
          const n = (await rpcCall(sock(a as G), 'cancel', { id: a.id })) as NoticeView;
          io.out((a as G).json ? json(n) : formatNotice(n));
          return EXIT.OK;
        }),
    )
    .command(
      // `--guest` is nestctl's switch to the guest agent's commands (nestctl.ts), so the
      // guest to filter on is a positional here: `nestctl notices vm1`.
      'notices [name]',
      "the notice journal: every notice (or one guest's), its state and outcome",
      (c) => c.positional('name', { type: 'string', describe: 'only this guest' }),
      (a) =>
        run(a as G, io, async () => {
          const ns = (await rpcCall(
            sock(a as G),
            'notices',
            a.name ? { guest: a.name } : {},
          )) as NoticeView[];
          io.out((a as G).json ? json(ns) : ns.length ? noticesTable(ns) : '(no notices)');
          return EXIT.OK;
        }),
    )
    .epilogue(HOST_EXIT_HELP);
}

type Res = { memoryBytes: number; cpus: number };

/**
 * `nestctl plan VM`: the books' answer, then the guest's own plan project by project (in
 * the order it would act), or why there is none (refused by the books, guest away); with
 * the inventory of its last hello as a fallback when the guest could not be asked.
 */
export function hostPlanText(
  vm: string,
  p: {
    ok: boolean;
    allocation?: Res;
    books: { granted: Res; floor: Res };
    problems: { field: string; message: string }[];
    /** Set when the hypervisor refused it (DOMAIN_DOWN, PREREQUISITE_MISSING). */
    code?: string;
    inventory: { projects: { name: string; priority: number; state: string }[] } | null;
    guestPlan: PlanResult | null;
    note?: string;
  },
): string {
  const r = (x: Res | undefined): string =>
    x ? `${fmtBytes(x.memoryBytes)}, ${cpusText(x.cpus)}` : '-';
  const out = [
    p.ok
      ? `${vm}: ${r(p.books.granted)} now → ${r(p.allocation)} after (floor ${r(p.books.floor)})`
      : `${vm}: refused${p.code ? ` (${p.code})` : ''}\n${p.problems.map((x) => `  ${x.field}: ${x.message}`).join('\n')}`,
  ];
  const g = p.guestPlan;
  if (g) {
    out.push(
      `guest's plan: projects share ${r(g.projectAllocation)}; ${g.fits ? 'every running project keeps running' : 'some projects stop'}`,
      '',
      table(
        ['project', 'priority', 'action', 'before', 'after', 'reason'],
        g.projects.map((x) => [
          x.project,
          x.priority,
          x.action,
          fmtLimits(x.before),
          x.action === 'stopped' ? 'stopped' : fmtLimits(x.after),
          x.reason,
        ]),
      ),
    );
    if (g.omitted) out.push(`(${g.omitted} more projects, unchanged or least affected, left out)`);
    for (const line of g.reasons) out.push(`- ${line}`);
    out.push('(dry run: nothing was changed, on the host or in the guest)');
  } else if (p.inventory) {
    out.push(
      '',
      table(
        ['project', 'priority', 'state'],
        [...p.inventory.projects]
          .sort((x, y) => x.priority - y.priority)
          .map((x) => [x.name, x.priority, x.state]),
      ),
      `(from the guest's last hello; lowest priority gives first${p.note ? `; ${p.note}` : ''})`,
    );
  } else if (p.note) out.push(`(${p.note})`);
  return out.join('\n');
}
