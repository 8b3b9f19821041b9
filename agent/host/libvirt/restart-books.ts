/**
 * After a domain starts again (`virsh destroy` + `virsh start`, a host reboot: the events
 * follower's `Started`), libvirt gives it the vCPUs and memory of its persistent XML, not
 * what the last reclaim left (docs/libvirt.md, "Books"):
 *
 *   observe   the live view is read again (a notice issued meanwhile: read again)
 *   follow    the host broker journals and logs the books set to what libvirt reports
 *   re-apply  with `libvirt.afterRestart: reapply` (the default) what the reclaims in force
 *             had taken is taken back: one reclaim notice of the difference, through the
 *             usual cascade (journaled, sent when the guest says hello, the VM lowered
 *             after its outcome), `source: restart`
 *
 * A domain that restarted while the broker was not running is caught up at the broker's
 * start (catchUp): a running domain for which libvirt reports more than the books, with no
 * notice open, is taken as restarted. Reading fails (the domain went down again at once):
 * logged, the books stay, and the next `Started` tries again.
 */
import type { Resources } from '../../broker/types';
import type { Logger } from '../../common/log';
import type { GuestConfig, LibvirtGuestConfig } from '../config';
import type { IssueRequest } from '../host-broker';
import { BALLOON_TOLERANCE_BYTES } from './actuator';
import type { DomainView, LibvirtDomains } from './domains';

/**
 * What the domain was started with, as libvirt reports it. A virtio-mem guest's memory is
 * the boot memory plus the device's `<requested>`: at `Started` its `<current>` is still 0
 * (the guest's driver plugs the requested memory by itself once it loads: 256 MiB within
 * the real-guest test's ~30–85 s boot under TCG, docs/libvirt.md "Figures"), and counting
 * only what is plugged yet would book the guest at its boot memory.
 */
export function startedResources(view: DomainView, memoryMode: string): Resources {
  const vm = view.info.virtioMem;
  if (memoryMode !== 'virtio-mem' || !vm) return view.resources;
  return { ...view.resources, memoryBytes: view.info.memory.baseBytes + vm.requestedBytes };
}

export interface BooksFollower {
  booksFor(guest: string): { seq: number; granted: Resources };
  resyncBooks(
    guest: string,
    reported: Resources,
    reason: string,
    seenSeq?: number,
  ): Promise<{ granted: Resources } | 'stale'>;
  /** Absent: the books follow libvirt, nothing is re-applied. */
  issue?(kind: 'reclaim', req: IssueRequest): Promise<{ record: { notice: { id: string } } }>;
  /** Whether the guest has a notice not yet final (catchUp leaves such a guest alone). */
  hasOpenNotice?(guest: string): boolean;
}

export interface RestartPolicy {
  afterRestart: 'reapply' | 'follow';
  reapplyDeadlineMs: number;
}

/** Reads again when a notice was issued while libvirt was being read, at most this often. */
const ATTEMPTS = 3;

/** `Started` details are libvirt's (virsh(1), `event`): Booted, Migrated, Restored, … */
const STARTED = 'Started';

/** CPUs below this are rounding, not a difference (the books count CPUs to 1/1000). */
const CPU_EPSILON = 0.0005;

/**
 * The memory difference that is rounding, not a restart: one virtio-mem block (a request
 * is rounded up to whole blocks: the VM may keep up to a block more than the books), or
 * the balloon's tolerance.
 */
function memoryTolerance(lv: LibvirtGuestConfig, view: DomainView): number {
  return lv.memoryMode === 'virtio-mem'
    ? (view.info.virtioMem?.blockBytes ?? 2 * 1024 * 1024)
    : BALLOON_TOLERANCE_BYTES;
}

/** What libvirt has beyond `books` (each resource at least 0; rounding counted as 0). */
export function beyond(reported: Resources, books: Resources, memoryTolBytes: number): Resources {
  const cpus = Math.round((reported.cpus - books.cpus) * 1000) / 1000;
  const memoryBytes = reported.memoryBytes - books.memoryBytes;
  return {
    cpus: cpus > CPU_EPSILON ? cpus : 0,
    memoryBytes: memoryBytes >= memoryTolBytes && memoryBytes > 0 ? memoryBytes : 0,
  };
}

export function followRestarts(
  domains: LibvirtDomains,
  broker: BooksFollower,
  guests: () => readonly GuestConfig[],
  log: Logger,
  policy: RestartPolicy,
): { done: () => Promise<void>; stop: () => void; catchUp: () => void } {
  let chain: Promise<void> = Promise.resolve();
  const enqueue = (fn: () => Promise<void>): void => {
    // One at a time, in event order: two starts in a row end with the last one's view.
    chain = chain.then(fn);
  };

  /**
   * Follow (and re-apply); `why` names the start for the journal and the logs. `read`: the
   * books and the view a caller just read, in that order, used as the first reading.
   */
  const restarted = async (
    g: GuestConfig,
    lv: LibvirtGuestConfig,
    why: string,
    read?: { books: { seq: number; granted: Resources }; view: DomainView },
  ) => {
    // A notice issued while libvirt is read may be actuated before or after the read:
    // the books are set only from a reading no notice overtook, else read again.
    for (let i = 1; i <= ATTEMPTS; i++) {
      const first = i === 1 ? read : undefined;
      const books = first?.books ?? broker.booksFor(g.name);
      const view = first?.view ?? (await domains.view(lv));
      const r = await broker.resyncBooks(
        g.name,
        startedResources(view, lv.memoryMode),
        why,
        books.seq,
      );
      if (r === 'stale') continue;
      await reapply(g, lv, books.granted, r.granted, view, why);
      return;
    }
    log.warn(
      { guest: g.name, domain: lv.domain },
      'domain started, but notices kept coming while libvirt was read; the books stay as they were',
    );
  };

  /** Takes back what the reclaims in force had taken (before) from what libvirt gave (after). */
  const reapply = async (
    g: GuestConfig,
    lv: LibvirtGuestConfig,
    before: Resources,
    after: Resources,
    view: DomainView,
    why: string,
  ): Promise<void> => {
    if (policy.afterRestart !== 'reapply' || !broker.issue) return;
    const change = beyond(after, before, memoryTolerance(lv, view));
    if (change.cpus === 0 && change.memoryBytes === 0) return;
    try {
      const { record } = await broker.issue('reclaim', {
        guest: g.name,
        change,
        deadlineMs: policy.reapplyDeadlineMs,
        reason: `re-applies the reclaims in force: ${why}`,
        source: 'restart',
      });
      log.info(
        { guest: g.name, domain: lv.domain, noticeId: record.notice.id, change, why },
        'domain started with its persistent vCPUs and memory: the reclaims in force are re-applied',
      );
    } catch (err) {
      // Refused (the domain lacks a prerequisite now, a floor, a backlog): the books stay
      // as libvirt reports them; an operator reclaims again.
      log.warn(
        { err, guest: g.name, domain: lv.domain, change },
        'domain started; the reclaims in force could not be re-applied, the books follow libvirt',
      );
    }
  };

  const onLifecycle = (e: { guest: string; domain: string; event: string; detail: string }) => {
    if (e.event !== STARTED) return;
    const g = guests().find((x) => x.name === e.guest);
    if (!g?.libvirt) return;
    const lv = g.libvirt;
    enqueue(async () => {
      try {
        await restarted(g, lv, `domain "${e.domain}" started (${e.detail || 'no detail'})`);
      } catch (err) {
        log.warn(
          { err, guest: g.name, domain: e.domain },
          'domain started but libvirt could not be read; the books stay as they were',
        );
      }
    });
  };

  /**
   * At the broker's start: a domain that restarted while the broker was down shows more
   * than the books (its persistent XML again). A guest with a notice still open is left to
   * it (it resumes and counts by its own end); a domain not running is caught by its
   * `Started` later.
   */
  const catchUp = (): void => {
    for (const g of guests()) {
      const lv = g.libvirt;
      if (!lv) continue;
      enqueue(async () => {
        if (broker.hasOpenNotice?.(g.name)) return;
        try {
          // The books before the view, as `restarted` reads them: its seq check holds.
          const books = broker.booksFor(g.name);
          const view = await domains.view(lv);
          const more = beyond(
            startedResources(view, lv.memoryMode),
            books.granted,
            memoryTolerance(lv, view),
          );
          if (more.cpus === 0 && more.memoryBytes === 0) return;
          await restarted(
            g,
            lv,
            `found at the broker's start: domain "${lv.domain}" has more than the books (started again while the broker was not running)`,
            { books, view },
          );
        } catch (err) {
          log.info(
            { err, guest: g.name, domain: lv.domain },
            'at start: libvirt could not be read for this guest; its next Started will say',
          );
        }
      });
    }
  };

  domains.on('lifecycle', onLifecycle);
  return {
    done: () => chain,
    catchUp,
    stop: () => {
      domains.off('lifecycle', onLifecycle);
    },
  };
}
