/**
 * The guest's operator API (docs/guest-agent.md): RpcServer
 * commands behind `nestctl --guest ...`, on `socket` (mode 0660, group `socketGroup`).
 *
 *   projects          table rows: name, priority, state, limits (kernel files), usage, pids
 *   plan              dry run: decisions and reasons for an allocation; nothing changes
 *   reclaim / restore a local notice, carried out like one from the host; streams progress
 *   notices           the notice journal, newest first
 *   cancel            withdraws a notice whose work has not started
 *   stop / start      one project, by an operator (remembered across agent restarts)
 *   status            the agent itself
 *
 * Every argument is checked at this boundary and every problem reported at once.
 */
import { systemClock } from '../common/clock';
import { randomUUID } from 'node:crypto';
import { NestError, type Problem } from '../common/errors';
import { parseCpus, parseDuration, parseSize } from '../common/units';
import type { RpcHandler, RpcServer } from '../common/rpc';
import type { Notice, NoticeKind, Resources } from '../broker/types';
import type { OperatorTarget } from './operator-target';

export const DEFAULT_LOCAL_DEADLINE_MS = 30_000;

interface ChangeArgs {
  change: Resources;
  deadlineMs: number;
  reason: string;
}

/** An argument the command does not take, one problem each, naming the ones it does. */
function unknownArgs(args: Record<string, unknown>, known: readonly string[]): Problem[] {
  return Object.keys(args)
    .filter((k) => !known.includes(k))
    .map((k) => ({
      field: k,
      value: args[k],
      message: `unknown argument (known: ${known.join(', ')})`,
    }));
}

/** Every problem of an operator's arguments at once (CONTRIBUTING.md). */
function throwIfProblems(problems: Problem[]): void {
  if (problems.length > 0)
    throw new NestError(
      'INPUT_INVALID',
      problems.map((p) => `${p.field}: ${p.message}`).join('; '),
      { problems },
    );
}

/** `--memory`, `--cpus`, `--deadline`, `--reason` → numbers, or every problem at once. */
export function parseChangeArgs(args: Record<string, unknown>, kind: NoticeKind): ChangeArgs {
  const problems = unknownArgs(args, ['memory', 'cpus', 'deadline', 'reason']);
  let memoryBytes = 0;
  let cpus = 0;
  if (args.memory !== undefined) {
    const r = parseSize(args.memory);
    if (r.ok) memoryBytes = r.value;
    else problems.push({ field: 'memory', value: args.memory, message: r.message });
  }
  if (args.cpus !== undefined) {
    const r = parseCpus(args.cpus);
    if (r.ok) cpus = r.value;
    else problems.push({ field: 'cpus', value: args.cpus, message: r.message });
  }
  let deadlineMs = DEFAULT_LOCAL_DEADLINE_MS;
  if (args.deadline !== undefined) {
    const r = parseDuration(args.deadline);
    if (r.ok) deadlineMs = r.value;
    else problems.push({ field: 'deadline', value: args.deadline, message: r.message });
  }
  if (args.reason !== undefined && (typeof args.reason !== 'string' || args.reason.length > 1024))
    problems.push({
      field: 'reason',
      value: args.reason,
      message: 'must be text of at most 1024 characters',
    });
  if (problems.length === 0 && args.memory === undefined && args.cpus === undefined)
    problems.push({
      field: 'memory',
      value: undefined,
      message: `a ${kind} needs --memory and/or --cpus (how much ${kind === 'reclaim' ? 'goes away' : 'comes back'})`,
    });
  throwIfProblems(problems);
  return {
    change: { memoryBytes, cpus },
    deadlineMs,
    reason: typeof args.reason === 'string' ? args.reason : `local ${kind} by an operator`,
  };
}

/** A local notice for this guest: seq 0 (local notices never move the host's seq). */
export function localNotice(
  agent: OperatorTarget,
  kind: NoticeKind,
  a: ChangeArgs,
  now = new Date(),
): Notice {
  // After the notices already pending (each leaves its allocation), as the book checks it.
  const cur = agent.book.allocationBefore();
  const sign = kind === 'reclaim' ? -1 : 1;
  const allocation = {
    memoryBytes: cur.memoryBytes + sign * a.change.memoryBytes,
    cpus: Math.round((cur.cpus + sign * a.change.cpus) * 1000) / 1000,
  };
  if (allocation.memoryBytes < 0 || allocation.cpus < 0)
    throw new NestError(
      'INPUT_INVALID',
      `cannot reclaim more than the guest has (${cur.memoryBytes} bytes, ${cur.cpus} CPUs)`,
      {
        problems: [
          {
            field: allocation.memoryBytes < 0 ? 'memory' : 'cpus',
            value: a.change,
            message: 'more than the guest has',
          },
        ],
      },
    );
  return {
    id: `local-${now.getTime()}-${randomUUID().slice(0, 8)}`,
    guest: agent.cfg.guest,
    seq: 0,
    kind,
    change: a.change,
    allocation,
    deadline: new Date(now.getTime() + a.deadlineMs).toISOString(),
    reason: a.reason,
    issuedAt: now.toISOString(),
  };
}

export function registerOperatorApi(
  server: RpcServer,
  agent: OperatorTarget,
  ready: Promise<void> = Promise.resolve(),
): void {
  // Every command waits until the agent has its projects up (start-up takes a moment).
  const rpc = {
    handle(cmd: string, fn: RpcHandler): void {
      server.handle(cmd, async (args, ctx) => {
        await ready;
        return fn(args, ctx);
      });
    },
  };
  rpc.handle('status', async () => agent.status());
  // The same reload as SIGHUP (agent/guest/reload.ts): refused, or what was applied.
  rpc.handle('reload', async () => {
    if (!agent.reload)
      throw new NestError('INPUT_INVALID', 'this agent has no config file to reload');
    return agent.reload('nestctl reload');
  });
  rpc.handle('projects', async () => agent.projectRows());
  rpc.handle('top', async (args) => agent.top({ processes: args.processes === true }));
  rpc.handle('plan', async (args) => {
    const kind: NoticeKind = args.kind === 'restore' ? 'restore' : 'reclaim';
    const rest = { ...args };
    delete rest.kind;
    const a = parseChangeArgs(rest, kind);
    const n = localNotice(agent, kind, a);
    const plan = await agent.broker.planFor(n.allocation);
    return {
      guest: agent.cfg.guest,
      kind,
      allocation: n.allocation,
      projectAllocation: plan.allocation,
      plan,
    };
  });
  for (const kind of ['reclaim', 'restore'] as const) {
    rpc.handle(kind, async (args, ctx) => {
      const change = parseChangeArgs(args, kind);
      // The deadline on the monotonic clock from the start: a local notice never goes
      // through its wall form (docs/reliability.md, "Time").
      const deadlineMono = systemClock.monotonic() + change.deadlineMs;
      const n = localNotice(agent, kind, change);
      const onProgress = (id: string, ev: unknown): void => {
        if (id === n.id) ctx.progress(ev);
      };
      agent.book.on('progress', onProgress);
      try {
        const sub = await agent.book.submit(n, 'local', { deadlineMono });
        if (!sub.outcome)
          throw new NestError(
            (sub.error?.code as 'NOTICE_REJECTED') ?? 'NOTICE_REJECTED',
            sub.error?.message ?? 'rejected',
            { problems: (sub.error?.problems as Problem[]) ?? [] },
          );
        ctx.progress({
          phase: 'accepted',
          noticeId: n.id,
          allocation: n.allocation,
          deadline: n.deadline,
        });
        const outcome = await sub.outcome;
        return { notice: n, outcome };
      } finally {
        agent.book.off('progress', onProgress);
      }
    });
  }
  rpc.handle('notices', async () =>
    agent.book.list().map((r) => ({
      id: r.notice.id,
      kind: r.notice.kind,
      source: r.source,
      seq: r.notice.seq,
      state: r.state,
      status: r.outcome?.status ?? null,
      receivedAt: r.receivedAt,
      finishedAt: r.finishedAt ?? null,
      deadline: r.notice.deadline,
      change: r.notice.change,
      allocation: r.notice.allocation,
      reason: r.notice.reason,
      runs: r.runs,
      error: r.error ?? null,
      outcome: r.outcome ?? null,
    })),
  );
  // Operator stop / start of one project (agent/guest/supervisor.ts).
  const projectArg = (args: Record<string, unknown>): string => {
    const problems = unknownArgs(args, ['project']);
    if (typeof args.project !== 'string')
      problems.push({ field: 'project', value: args.project, message: 'must be a project name' });
    throwIfProblems(problems);
    // An unknown name is PROJECT_UNKNOWN from the supervisor (the registry's config lookup).
    return args.project as string;
  };
  rpc.handle('stop', async (args) => agent.supervisor.operatorStop(projectArg(args)));
  rpc.handle('start', async (args) => agent.supervisor.operatorStart(projectArg(args)));
  rpc.handle('cancel', async (args) => {
    if (typeof args.noticeId !== 'string')
      throw new NestError('INPUT_INVALID', 'noticeId must be a string', {
        problems: [{ field: 'noticeId', value: args.noticeId, message: 'must be a string' }],
      });
    return { noticeId: args.noticeId, state: await agent.book.cancel(args.noticeId) };
  });
}
