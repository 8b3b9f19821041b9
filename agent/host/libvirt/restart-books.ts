/**
 * After a domain starts again (`virsh destroy` + `virsh start`, a host reboot: the events
 * follower's `Started`), libvirt gives it the vCPUs and memory of its persistent XML, not
 * what the last reclaim left. The books follow what libvirt reports then (docs/libvirt.md,
 * "Books"): the live view is read again, and the host broker journals and logs the books
 * set to it. Reading fails (the domain went down again at once): logged, the books stay,
 * and the next `Started` tries again.
 */
import type { Resources } from '../../broker/types';
import type { Logger } from '../../common/log';
import type { GuestConfig } from '../config';
import type { DomainView, LibvirtDomains } from './domains';

/**
 * What the domain was started with, as libvirt reports it. A virtio-mem guest's memory is
 * the boot memory plus the device's `<requested>`: at `Started` its `<current>` is still 0
 * (the guest's driver plugs the requested memory by itself once it loads: 256 MiB took
 * ~40 s under TCG, docs/libvirt.md "Figures"), and counting only what is plugged yet would
 * book the guest at its boot memory.
 */
export function startedResources(view: DomainView, memoryMode: string): Resources {
  const vm = view.info.virtioMem;
  if (memoryMode !== 'virtio-mem' || !vm) return view.resources;
  return { ...view.resources, memoryBytes: view.info.memory.baseBytes + vm.requestedBytes };
}

export interface BooksFollower {
  booksFor(guest: string): { seq: number };
  resyncBooks(
    guest: string,
    reported: Resources,
    reason: string,
    seenSeq?: number,
  ): Promise<unknown>;
}

/** Reads again when a notice was issued while libvirt was being read, at most this often. */
const ATTEMPTS = 3;

/** `Started` details are libvirt's (virsh(1), `event`): Booted, Migrated, Restored, … */
const STARTED = 'Started';

export function followRestarts(
  domains: LibvirtDomains,
  broker: BooksFollower,
  guests: () => readonly GuestConfig[],
  log: Logger,
): { done: () => Promise<void>; stop: () => void } {
  let chain: Promise<void> = Promise.resolve();
  const onLifecycle = (e: { guest: string; domain: string; event: string; detail: string }) => {
    if (e.event !== STARTED) return;
    const g = guests().find((x) => x.name === e.guest);
    if (!g?.libvirt) return;
    const lv = g.libvirt;
    // One at a time, in event order: two starts in a row end with the last one's view.
    chain = chain.then(async () => {
      try {
        // A notice issued while libvirt is read may be actuated before or after the read:
        // the books are set only from a reading no notice overtook, else read again.
        for (let i = 1; i <= ATTEMPTS; i++) {
          const seq = broker.booksFor(g.name).seq;
          const view = await domains.view(lv);
          const r = await broker.resyncBooks(
            g.name,
            startedResources(view, lv.memoryMode),
            `domain "${e.domain}" started (${e.detail || 'no detail'})`,
            seq,
          );
          if (r !== 'stale') return;
        }
        log.warn(
          { guest: g.name, domain: e.domain },
          'domain started, but notices kept coming while libvirt was read; the books stay as they were',
        );
      } catch (err) {
        log.warn(
          { err, guest: g.name, domain: e.domain },
          'domain started but libvirt could not be read; the books stay as they were',
        );
      }
    });
  };
  domains.on('lifecycle', onLifecycle);
  return {
    done: () => chain,
    stop: () => {
      domains.off('lifecycle', onLifecycle);
    },
  };
}
