/**
 * The host broker's view of its libvirt domains (docs/libvirt.md): everything is asked of
 * libvirt, never typed twice in host.yaml and never guessed (the domain's cgroup and its
 * channel's socket path both change with the domain id at every start).
 *
 *   state        `virsh domstate`
 *   live XML     `virsh dumpxml`: the channel's socket path, vCPUs, memory devices
 *   allocation   the persistent XML (`dumpxml --inactive`): what the VM is given at start,
 *                which no live change of ours alters, so books replayed after a restart of
 *                the broker start from the same place
 *   life-cycle   `virsh event --loop --all` (events.ts): a domain that starts again is
 *                announced, and its guest's channel is retried at once
 */
import { EventEmitter } from 'node:events';
import { NestError, type Problem } from '../../common/errors';
import { silentLogger, type Logger } from '../../common/log';
import type { GuestConfig, HostConfig, LibvirtGuestConfig } from '../config';
import {
  missingPrerequisites,
  parseDomainXml,
  virtioMemGuestBytes,
  type DomainXmlInfo,
} from './domain-xml';
import { DomainEvents, type DomainEvent } from './events';
import type { DomainState, Virsh } from './virsh';

/** What libvirt reports of a guest's resources, in the units of the books. */
export interface DomainResources {
  cpus: number;
  memoryBytes: number;
}

export interface DomainView {
  domain: string;
  state: DomainState;
  info: DomainXmlInfo;
  /** CPUs and memory as the guest's modes count them (see resourcesOf). */
  resources: DomainResources;
}

/**
 * The guest's resources as libvirt reports them, per mode:
 *   cpuMode unplug       the live vCPU count
 *   cpuMode quota        global_quota / global_period of `virsh schedinfo` (unlimited: the
 *                        vCPU count), given as `quotaCpus`
 *   memoryMode virtio-mem  boot memory + the virtio-mem device's <current>
 *   memoryMode balloon   the balloon's `actual` (`virsh dommemstat`), given as
 *                        `balloonBytes`; else <currentMemory>
 */
export function resourcesOf(
  info: DomainXmlInfo,
  modes: Pick<LibvirtGuestConfig, 'cpuMode' | 'memoryMode'>,
  measured: { quotaCpus?: number; balloonBytes?: number } = {},
): DomainResources {
  const cpus =
    modes.cpuMode === 'quota' && measured.quotaCpus !== undefined
      ? measured.quotaCpus
      : info.vcpus.current;
  const memoryBytes =
    modes.memoryMode === 'virtio-mem'
      ? (virtioMemGuestBytes(info) ?? info.memory.currentBytes)
      : (measured.balloonBytes ?? info.memory.currentBytes);
  return { cpus, memoryBytes };
}

/** CPUs given by a schedinfo's global quota (quota -1: no limit). */
export function quotaCpus(
  sched: Record<string, number | string>,
  vcpus: number,
): number | undefined {
  const q = sched.global_quota;
  const p = sched.global_period;
  if (typeof q !== 'number' || typeof p !== 'number' || p <= 0) return undefined;
  if (q < 0) return vcpus;
  return Math.round((q / p) * 1000) / 1000;
}

export interface LibvirtDomainsEvents {
  /** A life-cycle event of a domain a guest names (`Started`, `Stopped`, …). */
  lifecycle: [{ guest: string; domain: string; event: string; detail: string }];
  /** Every event of every domain, a guest's or not (`guests: auto` follows them all). */
  'domain-event': [DomainEvent];
  /** virsh event was restarted: events may have been missed; re-read what matters. */
  resync: [];
  /** A guest's channel connected to this socket path (read from the live XML). */
  channel: [{ guest: string; domain: string; path: string }];
}

export class LibvirtDomains extends EventEmitter {
  private readonly log: Logger;
  private events: DomainEvents | null = null;
  /** The guests in force: read at each event, so a reload or `guests: auto` is followed. */
  private readonly guests: () => readonly GuestConfig[];

  constructor(
    readonly virsh: Virsh,
    guests: readonly GuestConfig[] | (() => readonly GuestConfig[]),
    log?: Logger,
  ) {
    super();
    this.log = log ?? silentLogger();
    this.guests = typeof guests === 'function' ? guests : () => guests;
  }

  /** Starts following life-cycle events (a child `virsh event --loop --all`). */
  follow(opts: { binary?: string; restartMs?: number } = {}): DomainEvents {
    if (this.events) return this.events;
    const ev = new DomainEvents({ uri: this.virsh.uri, log: this.log, ...opts });
    ev.on('event', (e: DomainEvent) => this.onEvent(e));
    ev.on('spawn', ({ restarts }: { restarts: number }) => {
      if (restarts > 0) this.emit('resync');
    });
    this.events = ev.start();
    return ev;
  }

  async stop(): Promise<void> {
    await this.events?.stop();
    this.events = null;
  }

  private onEvent(e: DomainEvent): void {
    this.emit('domain-event', e);
    if (e.type !== 'lifecycle') return;
    const guest = this.guests().find((g) => g.libvirt?.domain === e.domain)?.name;
    if (!guest) return;
    const [event = '', ...rest] = e.detail.split(/\s+/);
    this.log.info({ guest, domain: e.domain, event, detail: rest.join(' ') }, 'domain event');
    this.emit('lifecycle', { guest, domain: e.domain, event, detail: rest.join(' ') });
  }

  /**
   * Calls `fn` when the guest's domain may be reachable again: its `Started` or `Resumed`
   * event, or virsh event restarted (events may have been missed). Returns the function
   * that removes both listeners (ReconnectingChannel's `wake`).
   */
  onDomainBack(guest: string, fn: () => void): () => void {
    const onLifecycle = (e: { guest: string; event: string }): void => {
      if (e.guest === guest && (e.event === 'Started' || e.event === 'Resumed')) fn();
    };
    this.on('lifecycle', onLifecycle);
    this.on('resync', fn);
    return () => {
      this.off('lifecycle', onLifecycle);
      this.off('resync', fn);
    };
  }

  /** The channel path each guest last connected to (operators' status, tests). */
  readonly channels = new Map<string, string>();

  noteChannel(guest: string, domain: string, path: string): void {
    this.channels.set(guest, path);
    this.emit('channel', { guest, domain, path });
  }

  async state(domain: string): Promise<DomainState> {
    return this.virsh.domstate(domain);
  }

  /** State and live XML; DOMAIN_DOWN when the domain is not running. */
  async running(domain: string): Promise<DomainXmlInfo> {
    const state = await this.virsh.domstate(domain);
    if (state !== 'running')
      throw new NestError('DOMAIN_DOWN', `libvirt domain "${domain}" is ${state}, not running`, {
        problems: [{ field: 'domain', value: domain, message: `state is "${state}"` }],
      });
    return parseDomainXml(await this.virsh.dumpxml(domain));
  }

  /** The socket path of the domain's org.nestbroker.0 channel, from its live XML. */
  async channelPath(domain: string): Promise<string> {
    const info = await this.running(domain);
    const path = info.channel?.path;
    if (!path)
      throw new NestError(
        'PREREQUISITE_MISSING',
        `libvirt domain "${domain}" has no unix channel named org.nestbroker.0 with a socket path`,
        { problems: [{ field: 'domain', value: domain, message: 'no org.nestbroker.0 channel' }] },
      );
    return path;
  }

  /** What libvirt reports now for a guest: state, live XML, resources in its modes. */
  async view(g: LibvirtGuestConfig): Promise<DomainView> {
    const info = await this.running(g.domain);
    const measured: { quotaCpus?: number; balloonBytes?: number } = {};
    if (g.cpuMode === 'quota')
      measured.quotaCpus = quotaCpus(await this.virsh.schedinfo(g.domain), info.vcpus.current);
    if (g.memoryMode === 'balloon')
      measured.balloonBytes = (await this.virsh.dommemstat(g.domain)).actualBytes;
    return {
      domain: g.domain,
      state: 'running',
      info,
      resources: resourcesOf(info, g, measured),
    };
  }

  /**
   * What the domain lacks for the guest's modes, as problems (field `domain.<prerequisite>`,
   * the domain as value): every lack at once.
   */
  static prerequisiteProblems(g: LibvirtGuestConfig, info: DomainXmlInfo): Problem[] {
    return missingPrerequisites(info, g).map((m) => ({
      field: `domain.${m.prerequisite}`,
      value: g.domain,
      message: m.message,
    }));
  }
}

/**
 * Fills in the allocation of every libvirt guest whose host.yaml gives none, from the
 * domain's persistent XML (the vCPUs it starts with; boot memory plus the virtio-mem
 * device's requested size, or <currentMemory> for a balloon), and checks the floors
 * against it. Every problem at once, as CONFIG_INVALID.
 */
export async function resolveAllocations(
  cfg: Readonly<HostConfig>,
  virsh: Virsh,
): Promise<Readonly<HostConfig>> {
  if (cfg.hypervisor.type !== 'libvirt') return cfg;
  const problems: Problem[] = [];
  const guests: GuestConfig[] = [];
  for (const [i, g] of cfg.guests.entries()) {
    if (!g.libvirt || !g.allocationFromLibvirt) {
      guests.push(g);
      continue;
    }
    let info: DomainXmlInfo;
    try {
      info = parseDomainXml(await virsh.dumpxml(g.libvirt.domain, { inactive: true }));
    } catch (err) {
      problems.push({
        field: `guests[${i}].domain`,
        value: g.libvirt.domain,
        message: `cannot read the allocation from libvirt: ${(err as Error).message}`,
      });
      guests.push(g);
      continue;
    }
    const memoryBytes =
      g.libvirt.memoryMode === 'virtio-mem' && info.virtioMem
        ? info.memory.baseBytes + info.virtioMem.requestedBytes
        : // The balloon covers the boot memory only; libvirt lowers a larger
          // <currentMemory> to it at start.
          Math.min(info.memory.currentBytes, info.memory.baseBytes);
    const allocation = { cpus: info.vcpus.current, memoryBytes };
    if (g.floor.cpus > allocation.cpus)
      problems.push({
        field: `guests[${i}].floor.cpus`,
        value: g.floor.cpus,
        message: `guests[${i}].floor.cpus (${g.floor.cpus}) exceeds the domain's ${allocation.cpus} vCPUs`,
      });
    if (g.floor.memoryBytes > allocation.memoryBytes)
      problems.push({
        field: `guests[${i}].floor.memory`,
        value: g.floor.memoryBytes,
        message: `guests[${i}].floor.memory exceeds the domain's memory (${allocation.memoryBytes} bytes)`,
      });
    guests.push({ ...g, allocation, allocationFromLibvirt: false });
  }
  if (problems.length > 0)
    throw new NestError(
      'CONFIG_INVALID',
      `host config has ${problems.length} problem(s):\n` +
        problems.map((p) => `  - ${p.field}: ${p.message}`).join('\n'),
      { problems },
    );
  return deepFreeze({ ...cfg, guests });
}

function deepFreeze<T>(o: T): Readonly<T> {
  if (o && typeof o === 'object' && !Object.isFrozen(o)) {
    for (const v of Object.values(o as Record<string, unknown>)) deepFreeze(v);
    Object.freeze(o);
  }
  return o;
}
