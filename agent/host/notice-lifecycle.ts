/**
 * The lifecycle of one host notice (docs/architecture.md, "A notice, end to end"):
 *
 *   reclaim: send `notice` → ack → progress* → outcome (journaled) → actuate down → done
 *   restore: actuate up FIRST → send `restore` → outcome
 *   late:    no outcome by the deadline → GUEST_LATE; removed anyway only with force
 *
 * Delivery goes through the broker role (agent/broker/broker.ts: one step, one child: the
 * guest); the guest's answers arrive through agent/host/guest-connections.ts.
 */
import { runBroker, type ChildHandle, type StepJournal } from '../broker/broker';
import type { Notice, Outcome } from '../broker/types';
import { NestError, isNestError } from '../common/errors';
import type { Logger } from '../common/log';
import { newMessageId } from '../protocol/messages';
import type { GuestConfig } from './config';
import type { ActuationReport } from './actuator';
import { faultPoint } from '../common/fault';
import { GuestConnections } from './guest-connections';
import { FINAL, type HostNoticeRecord } from './notice-store';
import { creditedByOutcome } from './books';

/** Runs each notice's lifecycle once, however often it is asked for. */
export abstract class NoticeLifecycle extends GuestConnections {
  protected readonly running = new Map<string, Promise<HostNoticeRecord>>();
  protected readonly aborts = new Map<string, AbortController>();

  protected track(rec: HostNoticeRecord): Promise<HostNoticeRecord> {
    const id = rec.notice.id;
    const existing = this.running.get(id);
    if (existing) return existing;
    const p = this.lifecycle(rec)
      .catch(async (err: unknown) => {
        this.log.error({ err, noticeId: id }, 'notice lifecycle failed');
        rec.error = errorOf(err);
        await this.store.save(rec).catch(() => undefined);
        return rec;
      })
      .finally(() => {
        this.running.delete(id);
        this.aborts.delete(id);
        this.deadlines.delete(id);
        // Before compact, which may fold it away (metrics read the whole record).
        if (FINAL.has(rec.state)) this.emit('finished', rec);
        this.store.compact(rec.notice.guest);
      });
    this.running.set(id, p);
    return p;
  }

  protected async lifecycle(rec: HostNoticeRecord): Promise<HostNoticeRecord> {
    const g = this.guest(rec.notice.guest);
    const log = this.log.child({ noticeId: rec.notice.id, guest: g.name });
    if (rec.notice.kind === 'restore' && !rec.actuation) {
      // Restore: the VM gets the resources BEFORE the guest is told it may use them.
      this.note(rec, 'actuating');
      rec.actuation = await this.deps.actuator.apply(g, rec.notice.allocation, 'up', {
        // A vCPU the guest and QEMU lost while libvirt still lists it cannot be plugged
        // back live: docs/libvirt.md, "Removal modes".
        guestReport: () => this.links.get(g.name)?.reported,
      });
      rec.actuatedAt = this.stamp();
      const status = rec.actuation.status;
      if (status === 'partial' || status === 'failed') {
        // The VM did not get (all of) it: the guest is not told it may use it, and the
        // books count only what libvirt added (notice-store.ts bookedChange).
        rec.state = status;
        rec.error = actuationError(g.name, rec.actuation);
        rec.finishedAt = rec.actuatedAt;
        await this.store.save(rec);
        this.note(rec, status);
        return rec;
      }
      await this.store.save(rec);
      this.note(rec, 'actuated');
    }

    const outcome = await this.deliverAndWait(rec, g, log);
    // The outcome is journaled before anything depends on it (it was taken as it arrived).
    await this.outcomeSaved.get(rec.notice.id);

    if (rec.state === 'cancelled') return rec;
    if (rec.notice.kind === 'restore') {
      if (outcome) rec.state = 'done';
      else {
        rec.state = 'done';
        rec.late = true;
        rec.error ??= {
          code: 'GUEST_LATE',
          message: `guest "${g.name}" did not answer the restore by its deadline`,
        };
      }
      rec.finishedAt = this.stamp();
      await this.store.save(rec);
      this.note(rec, rec.late ? 'late' : 'done');
      return rec;
    }

    // Reclaim.
    if (!outcome && rec.state === 'refused') {
      // The guest rejected it (onAck): its own error stands; it was not late.
      rec.finishedAt = this.stamp();
      await this.store.save(rec);
      this.note(rec, 'refused');
      return rec;
    }
    if (!outcome) {
      rec.late = true;
      rec.error = {
        code: 'GUEST_LATE',
        message: `guest "${g.name}" sent no outcome by the deadline ${rec.notice.deadline}`,
      };
      if (!rec.force) {
        rec.state = 'late';
        rec.finishedAt = this.stamp();
        await this.store.save(rec);
        this.note(rec, 'late');
        log.warn('guest late; nothing removed (no --force)');
        // Tell the guest we gave up, so a slow cascade does not go on for nothing.
        const link = this.links.get(g.name);
        if (link?.open)
          this.sendTo(link, { type: 'cancel', id: newMessageId(), noticeId: rec.notice.id });
        return rec;
      }
      log.warn('guest late; removing anyway (--force)');
    } else if (outcome.status === 'failed' && !rec.force) {
      rec.state = 'refused';
      rec.error = {
        code: 'NOTICE_REJECTED',
        message: `guest "${g.name}" reported that it could not free anything (status failed)`,
      };
      rec.finishedAt = this.stamp();
      await this.store.save(rec);
      this.note(rec, 'refused');
      return rec;
    }

    // The outcome (or the forced deadline) is journaled: now, and only now, take it away.
    faultPoint('before-actuation');
    this.note(rec, 'actuating');
    rec.actuation = await this.deps.actuator.apply(g, rec.notice.allocation, 'down', {
      // The guest's own view confirms a vCPU unplug that libvirt does not show (TCG):
      // docs/libvirt.md, "Removal modes".
      guestReport: () => this.links.get(g.name)?.reported,
    });
    rec.actuatedAt = this.stamp();
    const status = rec.actuation.status;
    rec.state = status === 'partial' || status === 'failed' ? status : 'done';
    if (rec.state !== 'done') rec.error = actuationError(g.name, rec.actuation);
    rec.finishedAt = rec.actuatedAt;
    await this.store.save(rec);
    this.note(rec, rec.state === 'done' ? 'actuated' : rec.state);
    return rec;
  }

  /** Delivers the notice through the broker role and waits for its outcome (undefined: none). */
  protected async deliverAndWait(
    rec: HostNoticeRecord,
    g: GuestConfig,
    log: Logger,
  ): Promise<Outcome | undefined> {
    if (rec.outcome) return rec.outcome;
    const ac = new AbortController();
    this.aborts.set(rec.notice.id, ac);
    const handle: ChildHandle<Notice, Outcome> = {
      name: g.name,
      deliver: async (notice) => {
        const link = this.links.get(g.name);
        if (!link?.open || !link.hello)
          throw new NestError(
            'GUEST_UNREACHABLE',
            `guest "${g.name}" is not connected; the notice is sent when it says hello`,
          );
        // The ack wait never runs past the deadline: a stopped guest is reported late at
        // its deadline, not a delivery timeout later.
        const left = this.deadlineOf(rec) - this.clock.monotonic();
        const ack = await this.request(
          link,
          notice.id,
          this.noticeMessage(notice, link),
          Math.max(1, Math.min(this.deps.deliverTimeoutMs ?? 5_000, left)),
        );
        this.onAck(rec, ack);
      },
      apply: (notice, ctx) =>
        new Promise<Outcome>((resolve, reject) => {
          if (rec.outcome) return resolve(rec.outcome);
          if (rec.state === 'refused')
            return reject(new NestError('NOTICE_REJECTED', rec.error?.message ?? 'refused'));
          const onAbort = (): void => {
            this.outcomeWaiters.delete(notice.id);
            reject(ctx.signal.reason);
          };
          if (ctx.signal.aborted) return onAbort();
          ctx.signal.addEventListener('abort', onAbort, { once: true });
          this.outcomeWaiters.set(notice.id, (o) => {
            ctx.signal.removeEventListener('abort', onAbort);
            this.outcomeWaiters.delete(notice.id);
            if (o instanceof NestError) reject(o);
            else resolve(o);
          });
        }),
    };
    const journal: StepJournal<Outcome> = {
      get: async () => ({ deliveredAt: rec.ackedAt, outcome: rec.outcome }),
      // The record is the journal: ack and outcome are saved as they arrive (onAck/onOutcome).
      put: async () => undefined,
    };
    try {
      await runBroker(
        [{ child: g.name, order: 0, notice: rec.notice }],
        new Map([[g.name, handle]]),
        {
          noticeId: rec.notice.id,
          deadline: new Date(rec.notice.deadline),
          deadlineMono: this.deadlineOf(rec),
          clock: this.clock,
          signal: ac.signal,
          journal,
          log,
          overrunMs: 0,
          deliverTimeoutMs: this.deps.deliverTimeoutMs ?? 5_000,
          onProgress: (ev) => {
            if (ev.phase === 'notified') this.note(rec, 'delivered');
          },
          // A synthetic outcome is never journaled as the guest's: rec.outcome stays unset.
          failed: () => undefined as unknown as Outcome,
        },
      );
    } catch (err) {
      if (!isNestError(err)) throw err;
    }
    return rec.outcome;
  }

  /** A late reclaim's outcome goes to reconcileLate; any other to the waiting lifecycle. */
  protected override async onOutcome(g: GuestConfig, outcome: Outcome): Promise<void> {
    const rec = this.store.get(outcome.noticeId);
    if (rec && !rec.outcome && rec.state === 'late' && rec.notice.guest === g.name)
      return this.reconcileLate(g, rec, outcome);
    return super.onOutcome(g, outcome);
  }

  /**
   * The outcome of a reclaim the host had already given up on (late, no force): the guest
   * carried it out after all, and recorded the smaller allocation unless it failed outright
   * (agent/guest/executor.ts). The books follow what the guest did: a complete or partial
   * outcome makes the notice count again and the VM is lowered by the usual path (the
   * record goes back to `reported`, journaled, and its lifecycle actuates: a host restarted
   * in between resumes it); a failed one changed nothing on either side: it stays late.
   */
  private async reconcileLate(
    g: GuestConfig,
    rec: HostNoticeRecord,
    outcome: Outcome,
  ): Promise<void> {
    const log = this.log.child({ guest: g.name, noticeId: rec.notice.id });
    if (outcome.guest !== g.name) return;
    rec.outcome = outcome;
    rec.outcomeAt = this.stamp();
    rec.credited = creditedByOutcome(rec.notice.change, outcome.freed);
    if (rec.notice.kind !== 'reclaim' || outcome.status === 'failed') {
      await this.store.save(rec);
      this.note(rec, 'outcome', { ms: outcome.ms });
      log.info({ status: outcome.status }, 'late outcome: the guest changed nothing; stays late');
      return;
    }
    rec.state = 'reported';
    rec.reconciledAt = rec.outcomeAt;
    rec.error = undefined;
    rec.finishedAt = undefined;
    await this.store.save(rec);
    this.note(rec, 'reconciling', { ms: outcome.ms });
    log.warn(
      { status: outcome.status, freed: outcome.freed },
      'late outcome: the guest carried the reclaim out; the books count it and the VM is lowered',
    );
    // An outcome that came while the lifecycle was still writing `late` waits for it to end
    // (it ends without acting: the record is no longer final), then actuates in a new one.
    const current = this.running.get(rec.notice.id);
    void (current ?? Promise.resolve()).then(() => this.track(rec));
  }
}

function errorOf(err: unknown): { code: string; message: string } {
  if (isNestError(err)) return { code: err.code, message: err.message };
  return { code: 'INTERNAL', message: err instanceof Error ? err.message : String(err) };
}

/** The error of a partial or failed actuation: its first failed step, and what moved. */
function actuationError(guest: string, a: ActuationReport): { code: string; message: string } {
  const first = a.errors[0];
  const moved =
    a.before && a.actual
      ? ` (libvirt: ${a.before.cpus} → ${a.actual.cpus} CPUs, ${a.before.memoryBytes} → ${a.actual.memoryBytes} bytes; target ${a.target.cpus} CPUs, ${a.target.memoryBytes} bytes)`
      : '';
  return {
    code: first?.code ?? 'TIMEOUT',
    message: `guest "${guest}": actuation ${a.status}${moved}${first ? `: ${first.message}` : ''}`,
  };
}
