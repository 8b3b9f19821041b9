/**
 * The host broker's operator API (docs/host-broker.md): commands on the unix socket, served
 * by RpcServer (agent/common/rpc.ts), used by `nestctl` (agent/cli/host-commands.ts).
 * Every argument is validated here, at the boundary, with every problem named.
 *
 * `plan` is answered from the books (what the reclaim would leave, floors) and, when they
 * allow it and the guest is connected, from the guest itself: the host asks it over the
 * channel for its dry run (`plan` → `plan-result`), project by project, since only the
 * guest knows its projects' minimums and usage. Nothing changes on either side. See
 * docs/host-broker.md.
 */
import { hostInventory } from '../../cgroup-adapter/host-usage';
import { NestError, isNestError, type Problem } from '../common/errors';
import { RpcServer, type RpcContext } from '../common/rpc';
import { parseCpus, parseDuration, parseSize } from '../common/units';
import type { Resources } from '../broker/types';
import type { PlanResult } from '../protocol/messages';
import { MAX_DEADLINE_AHEAD_MS } from '../protocol/schemas';
import {
  FINAL_STATES,
  type DomainStatus,
  type HostBroker,
  type HostNoticeRecord,
  type HostProgress,
} from './host-broker';
import type { Watcher } from './watcher';
import type { GuestConfig, LibvirtGuestConfig } from './config';
import type { LibvirtDomains } from './libvirt/domains';

export const DEFAULT_DEADLINE_MS = 60_000;

function args(a: Record<string, unknown>) {
  const problems: Problem[] = [];
  const str = (k: string, required: boolean): string | undefined => {
    const v = a[k];
    if (v === undefined && !required) return undefined;
    if (typeof v !== 'string' || v.length === 0) {
      problems.push({ field: k, value: v, message: `${k} must be a non-empty string` });
      return undefined;
    }
    return v;
  };
  const change = (required: boolean): Resources => {
    const out = { memoryBytes: 0, cpus: 0 };
    if (a.memory !== undefined) {
      const r = parseSize(a.memory);
      if (r.ok) out.memoryBytes = r.value;
      else problems.push({ field: 'memory', value: a.memory, message: `memory ${r.message}` });
    }
    if (a.cpus !== undefined) {
      const r = parseCpus(a.cpus);
      if (r.ok) out.cpus = r.value;
      else problems.push({ field: 'cpus', value: a.cpus, message: `cpus ${r.message}` });
    }
    if (required && a.memory === undefined && a.cpus === undefined)
      problems.push({ field: 'memory', value: undefined, message: 'give --memory and/or --cpus' });
    return out;
  };
  const deadline = (): number => {
    if (a.deadline === undefined) return DEFAULT_DEADLINE_MS;
    const r = parseDuration(a.deadline);
    if (!r.ok || r.value < 100 || r.value > MAX_DEADLINE_AHEAD_MS) {
      problems.push({
        field: 'deadline',
        value: a.deadline,
        message: !r.ok
          ? `deadline ${r.message}`
          : r.value < 100
            ? 'deadline must be at least 100ms'
            : // A guest refuses a notice whose deadline is further (docs/protocol.md, "Deadlines").
              `deadline must be at most ${MAX_DEADLINE_AHEAD_MS / 3_600_000}h`,
      });
      return 0;
    }
    return r.value;
  };
  const done = (): void => {
    if (problems.length)
      throw new NestError('INPUT_INVALID', problems.map((p) => p.message).join('; '), {
        problems,
      });
  };
  return { str, change, deadline, done };
}

/** The JSON shape a notice has on the API (and in `nestctl --json`). */
export function noticeView(r: HostNoticeRecord) {
  return {
    id: r.notice.id,
    guest: r.notice.guest,
    seq: r.notice.seq,
    kind: r.notice.kind,
    state: r.state,
    late: r.late ?? false,
    force: r.force,
    source: r.source,
    change: r.notice.change,
    allocation: r.notice.allocation,
    deadline: r.notice.deadline,
    reason: r.notice.reason,
    issuedAt: r.notice.issuedAt,
    sentAt: r.sentAt,
    ackedAt: r.ackedAt,
    outcomeAt: r.outcomeAt,
    actuatedAt: r.actuatedAt,
    finishedAt: r.finishedAt,
    reconciledAt: r.reconciledAt,
    outcome: r.outcome,
    credited: r.credited,
    actuation: r.actuation,
    error: r.error,
  };
}

export type NoticeView = ReturnType<typeof noticeView>;

/** What libvirt says of one guest's domain, never throwing (a down domain is a state). */
export async function domainStatus(
  domains: LibvirtDomains,
  g: LibvirtGuestConfig,
): Promise<DomainStatus> {
  try {
    const v = await domains.view(g);
    return {
      name: g.domain,
      state: v.state,
      id: v.info.id,
      cpus: v.resources.cpus,
      memoryBytes: v.resources.memoryBytes,
      vcpus: { current: v.info.vcpus.current, max: v.info.vcpus.max },
      channel: v.info.channel?.path,
    };
  } catch (err) {
    const e = err as { code?: string; message?: string };
    const state =
      e.code === 'DOMAIN_DOWN'
        ? await domains.state(g.domain).catch(() => 'DOMAIN_DOWN')
        : (e.code ?? 'INTERNAL');
    return { name: g.domain, state, error: e.message };
  }
}

export function registerHostApi(
  server: RpcServer,
  broker: HostBroker,
  watcher?: Watcher,
  /** `guests` as a function: a reload or `guests: auto` changes them. */
  libvirt?: { domains: LibvirtDomains; guests: () => readonly GuestConfig[] },
): RpcServer {
  server.handle('guests', async () => {
    const gs = broker.guests();
    if (!libvirt) return gs;
    // docs/libvirt.md: the vCPUs and memory as libvirt has them, next to the books.
    return Promise.all(
      gs.map(async (s) => {
        const lv = libvirt.guests().find((g) => g.name === s.name)?.libvirt;
        return lv ? { ...s, domain: await domainStatus(libvirt.domains, lv) } : s;
      }),
    );
  });

  server.handle('status', async (a) => ({
    // Static facts, read once (systeminformation; cgroup-adapter/host-usage.ts).
    inventory: await hostInventory().catch(() => null),
    // Per-process views are asked for (pidusage): `nestctl status --processes`.
    ...(a.processes === true && watcher ? { processes: await watcher.vmProcesses() } : {}),
    guests: broker.guests(),
    host: watcher ? await watcher.observe() : null,
    trigger: watcher?.triggerView() ?? null,
    notices: broker
      .notices()
      .filter((r) => !FINAL_STATES.includes(r.state))
      .map(noticeView),
  }));

  server.handle('projects', async (a) => {
    const v = args(a);
    const guest = v.str('guest', true);
    v.done();
    const s = broker.status(guest!);
    if (!s.inventory)
      throw new NestError(
        'GUEST_UNREACHABLE',
        `guest "${guest}" has not said hello since the host broker started: no inventory`,
      );
    return { guest: s.name, connected: s.connected, helloAt: s.helloAt, ...s.inventory };
  });

  server.handle('plan', async (a) => {
    const v = args(a);
    const guest = v.str('guest', true);
    const kind = a.restore === true ? 'restore' : 'reclaim';
    const change = v.change(kind === 'reclaim');
    v.done();
    const r = broker.check(kind, guest!, change);
    const s = broker.status(guest!);
    // A change the books allow is refused as the notice would be when the domain is down or
    // lacks a prerequisite (docs/libvirt.md): the guest is not even asked for its plan.
    let refusal: { code: string; problems: Problem[] } | undefined;
    if (r.ok)
      try {
        await broker.precheck(kind, guest!, r.allocation);
      } catch (err) {
        if (!isNestError(err)) throw err;
        refusal = {
          code: err.code,
          problems: err.problems.length
            ? err.problems
            : [{ field: 'guest', value: guest, message: err.message }],
        };
      }
    // The guest's own plan, only for a change the books allow (nothing to plan otherwise).
    let guestPlan: PlanResult | null = null;
    let note: string | undefined;
    if (r.ok && !refusal)
      try {
        guestPlan = await broker.askPlan(guest!, kind, r.allocation);
      } catch (err) {
        note = `no project-level plan from the guest: ${err instanceof Error ? err.message : String(err)}`;
      }
    return {
      guest,
      kind,
      change,
      books: r.books,
      ok: r.ok && !refusal,
      allocation: r.ok ? r.allocation : undefined,
      problems: refusal?.problems ?? (r.ok ? [] : r.problems),
      ...(refusal ? { code: refusal.code } : {}),
      inventory: s.inventory ?? null,
      guestPlan,
      ...(note ? { note } : {}),
    };
  });

  const runNotice = async (
    kind: 'reclaim' | 'restore',
    a: Record<string, unknown>,
    ctx: RpcContext,
  ) => {
    const v = args(a);
    const guest = v.str('guest', true);
    const reason = v.str('reason', false);
    const change = v.change(kind === 'reclaim');
    const deadlineMs = v.deadline();
    v.done();
    const { record, done } = await broker.issue(kind, {
      guest: guest!,
      change,
      deadlineMs,
      force: a.force === true,
      reason,
    });
    ctx.progress({
      noticeId: record.notice.id,
      guest,
      phase: 'issued',
      at: record.notice.issuedAt,
    });
    if (a.wait === false) return noticeView(record);
    const onProgress = (ev: HostProgress): void => {
      if (ev.noticeId === record.notice.id && ev.phase !== 'issued') ctx.progress(ev);
    };
    broker.on('progress', onProgress);
    try {
      return noticeView(await done);
    } finally {
      broker.off('progress', onProgress);
    }
  };
  server.handle('reclaim', (a, ctx) => runNotice('reclaim', a, ctx));
  server.handle('restore', (a, ctx) => runNotice('restore', a, ctx));

  server.handle('cancel', async (a) => {
    const v = args(a);
    const id = v.str('id', true);
    v.done();
    return noticeView(await broker.cancel(id!));
  });

  server.handle('notices', async (a) => {
    const v = args(a);
    const guest = v.str('guest', false);
    v.done();
    return broker.notices(guest).map(noticeView);
  });

  server.handle('notice', async (a) => {
    const v = args(a);
    const id = v.str('id', true);
    v.done();
    const r = broker.notice(id!);
    if (!r) throw new NestError('NOTICE_UNKNOWN', `no notice with id "${id}"`);
    return noticeView(r);
  });

  return server;
}
