/**
 * A libvirt domain's XML (`virsh dumpxml`), read with a real XML parser (fast-xml-parser),
 * never with regular expressions: attributes may come in any order, with either quote, and
 * elements may be nested or repeated (libvirt's formatdomain documentation). Only what the
 * host broker needs is read (docs/libvirt.md, "What is read from libvirt"):
 *
 *   - the `org.nestbroker.0` channel's socket path and state (live XML only: libvirt picks
 *     `/var/lib/libvirt/qemu/channel/target/domain-<id>-<name>/org.nestbroker.0` at start);
 *   - vCPUs: maximum, current, which are hotpluggable (`<vcpus>`), ACPI (`<features>`);
 *   - memory: `<memory>`, `<currentMemory>`, `<maxMemory>`, a virtio-mem device
 *     (`<size>`, `<block>`, `<requested>`, `<current>`) and the balloon (`<memballoon>`).
 */
import { XMLParser } from 'fast-xml-parser';
import { NestError } from '../../common/errors';

export const NESTBROKER_CHANNEL = 'org.nestbroker.0';

export interface DomainXmlInfo {
  name: string;
  /** The running domain's id (absent in a stopped domain's XML). */
  id?: number;
  uuid?: string;
  /** `kvm`, or `qemu` for TCG. */
  type: string;
  acpi: boolean;
  /** The unix channel named org.nestbroker.0; path only when libvirt has chosen one. */
  channel?: { path?: string; state?: string; alias?: string };
  vcpus: {
    max: number;
    current: number;
    /** ids of the vCPUs that are enabled now (all of 0..current-1 without `<vcpus>`). */
    enabled: number[];
    /** ids libvirt may hot-unplug or hot-plug (`hotpluggable='yes'` in `<vcpus>`). */
    hotpluggable: number[];
    /**
     * The fewest vCPUs a live unplug can leave: the enabled vCPUs that are not
     * hotpluggable (libvirt refuses to unplug those).
     */
    minLive: number;
  };
  memory: {
    /** `<memory>`: the whole of the guest's memory, memory devices' full size included. */
    totalBytes: number;
    /** `<currentMemory>`: the balloon's target. */
    currentBytes: number;
    /** `<maxMemory>`, needed for memory devices. */
    maxBytes?: number;
    /** `<memory>` minus every memory device's size: the boot memory. */
    baseBytes: number;
  };
  virtioMem?: {
    alias?: string;
    node?: number;
    sizeBytes: number;
    blockBytes: number;
    requestedBytes: number;
    /** What the guest has plugged (live XML only). */
    currentBytes?: number;
  };
  /** A balloon device (`<memballoon model='none'/>` is none). */
  balloon?: { model: string; alias?: string };
}

const REPEATED = new Set([
  'domain.devices.channel',
  'domain.devices.memory',
  'domain.devices.memballoon',
  'domain.vcpus.vcpu',
  'domain.cpu.numa.cell',
]);

const parser = new XMLParser({
  ignoreAttributes: false,
  attributeNamePrefix: '',
  textNodeName: '#text',
  parseAttributeValue: false,
  parseTagValue: false,
  isArray: (_name, jpath) => REPEATED.has(String(jpath)),
});

type Node = Record<string, unknown>;

/** libvirt's scaled integers (formatdomain, "Memory Allocation"): KiB when no unit. */
const UNITS: Record<string, number> = {
  b: 1,
  bytes: 1,
  kb: 1000,
  k: 1024,
  kib: 1024,
  mb: 1000 ** 2,
  m: 1024 ** 2,
  mib: 1024 ** 2,
  gb: 1000 ** 3,
  g: 1024 ** 3,
  gib: 1024 ** 3,
  tb: 1000 ** 4,
  t: 1024 ** 4,
  tib: 1024 ** 4,
};

function text(n: unknown): string | undefined {
  if (n === undefined || n === null) return undefined;
  if (typeof n === 'string' || typeof n === 'number') return String(n);
  const t = (n as Node)['#text'];
  return t === undefined ? undefined : String(t);
}

function attr(n: unknown, name: string): string | undefined {
  if (!n || typeof n !== 'object') return undefined;
  const v = (n as Node)[name];
  return typeof v === 'string' ? v : undefined;
}

function bytesOf(n: unknown, field: string): number | undefined {
  const t = text(n);
  if (t === undefined) return undefined;
  const unit = (attr(n, 'unit') ?? 'KiB').toLowerCase();
  const mult = UNITS[unit];
  if (!/^\d+$/.test(t.trim()) || mult === undefined)
    throw new NestError('LIBVIRT_ERROR', `domain XML: ${field} is "${t}" ${unit}, not a size`);
  return Number(t.trim()) * mult;
}

function int(s: string | undefined): number | undefined {
  return s !== undefined && /^\d+$/.test(s.trim()) ? Number(s.trim()) : undefined;
}

function arr(n: unknown): Node[] {
  return Array.isArray(n) ? (n as Node[]) : n === undefined ? [] : [n as Node];
}

/** Parses `virsh dumpxml` output. Throws LIBVIRT_ERROR when it is not a domain's XML. */
export function parseDomainXml(xml: string): DomainXmlInfo {
  let doc: Node;
  try {
    doc = parser.parse(xml, true) as Node;
  } catch (cause) {
    throw new NestError('LIBVIRT_ERROR', `domain XML does not parse: ${String(cause)}`, {
      cause,
    });
  }
  const d = doc.domain as Node | undefined;
  if (!d || typeof d !== 'object')
    throw new NestError('LIBVIRT_ERROR', 'the XML virsh returned has no <domain> element');
  const name = text(d.name);
  if (!name) throw new NestError('LIBVIRT_ERROR', 'domain XML: <name> is missing');

  const features = (d.features ?? {}) as Node;
  const acpi = typeof features === 'object' && 'acpi' in features;

  const devices = (d.devices ?? {}) as Node;
  const chan = arr(devices.channel).find(
    (c) => attr(c.target, 'name') === NESTBROKER_CHANNEL && attr(c, 'type') === 'unix',
  );
  const channel = chan
    ? {
        path: attr(chan.source, 'path'),
        state: attr(chan.target, 'state'),
        alias: attr(chan.alias, 'name'),
      }
    : undefined;

  const max = int(text(d.vcpu)) ?? 1;
  const current = int(attr(d.vcpu, 'current')) ?? max;
  const vcpuList = arr((d.vcpus as Node | undefined)?.vcpu);
  const enabled: number[] = [];
  const hotpluggable: number[] = [];
  let fixedEnabled = 0;
  if (vcpuList.length > 0) {
    for (const v of vcpuList) {
      const id = int(attr(v, 'id'));
      if (id === undefined) continue;
      const on = attr(v, 'enabled') === 'yes';
      const hot = attr(v, 'hotpluggable') === 'yes';
      if (on) enabled.push(id);
      if (hot) hotpluggable.push(id);
      if (on && !hot) fixedEnabled++;
    }
  } else {
    for (let i = 0; i < current; i++) enabled.push(i);
    // Without <vcpus> libvirt treats vCPU 0..current-1 as not hotpluggable (formatdomain).
    fixedEnabled = current;
  }

  const memDevices = arr(devices.memory);
  const vm = memDevices.find((m) => attr(m, 'model') === 'virtio-mem');
  const deviceBytes = memDevices.reduce(
    (sum, m) => sum + (bytesOf((m.target as Node | undefined)?.size, 'memory device size') ?? 0),
    0,
  );
  const totalBytes = bytesOf(d.memory, '<memory>') ?? 0;
  const virtioMem = vm
    ? (() => {
        const t = (vm.target ?? {}) as Node;
        return {
          alias: attr(vm.alias, 'name'),
          node: int(text(t.node)),
          sizeBytes: bytesOf(t.size, 'virtio-mem <size>') ?? 0,
          blockBytes: bytesOf(t.block, 'virtio-mem <block>') ?? 2 * 1024 * 1024,
          requestedBytes: bytesOf(t.requested, 'virtio-mem <requested>') ?? 0,
          currentBytes: bytesOf(t.current, 'virtio-mem <current>'),
        };
      })()
    : undefined;

  const mb = arr(devices.memballoon)[0];
  const balloonModel = attr(mb, 'model');
  const balloon =
    mb && balloonModel && balloonModel !== 'none'
      ? { model: balloonModel, alias: attr(mb.alias, 'name') }
      : undefined;

  return {
    name,
    id: int(attr(d, 'id')),
    uuid: text(d.uuid),
    type: attr(d, 'type') ?? '',
    acpi,
    channel,
    vcpus: {
      max,
      current,
      enabled,
      hotpluggable,
      minLive: Math.max(1, fixedEnabled),
    },
    memory: {
      totalBytes,
      currentBytes: bytesOf(d.currentMemory, '<currentMemory>') ?? totalBytes,
      maxBytes: bytesOf(d.maxMemory, '<maxMemory>'),
      baseBytes: totalBytes - deviceBytes,
    },
    virtioMem,
    balloon,
  };
}

export type CpuMode = 'unplug' | 'quota';
export type MemoryMode = 'virtio-mem' | 'balloon';

/** A prerequisite of the removal modes, by name (docs/libvirt.md, "What is read from libvirt"). */
export type Prerequisite = 'channel' | 'acpi' | 'hotpluggable-vcpus' | 'virtio-mem' | 'balloon';

export interface MissingPrerequisite {
  prerequisite: Prerequisite;
  /** What to add to the domain, in libvirt's own XML. */
  message: string;
}

/**
 * What the domain lacks for the guest's removal modes, every lack named (empty: nothing).
 * `channel` is checked too: without it the guest's agent cannot be told anything.
 */
export function missingPrerequisites(
  info: DomainXmlInfo,
  modes: { cpuMode: CpuMode; memoryMode: MemoryMode },
): MissingPrerequisite[] {
  const out: MissingPrerequisite[] = [];
  const lack = (prerequisite: Prerequisite, message: string): void => {
    out.push({ prerequisite, message });
  };
  if (!info.channel)
    lack(
      'channel',
      `no <channel type='unix'> with <target type='virtio' name='${NESTBROKER_CHANNEL}'/> (the guest agent's channel)`,
    );
  if (modes.cpuMode === 'unplug') {
    if (!info.acpi)
      lack('acpi', 'cpuMode unplug needs <features><acpi/></features> (CPU hot-unplug is ACPI)');
    const leaving = info.vcpus.hotpluggable.filter((id) => info.vcpus.enabled.includes(id));
    if (info.vcpus.hotpluggable.length === 0)
      lack(
        'hotpluggable-vcpus',
        "cpuMode unplug needs hotpluggable vCPUs: <vcpu current='N'>MAX</vcpu> and a <vcpus> block with hotpluggable='yes'",
      );
    else if (leaving.length === 0 && info.vcpus.max <= info.vcpus.current)
      lack(
        'hotpluggable-vcpus',
        'cpuMode unplug: no enabled vCPU is hotpluggable and none can be plugged',
      );
  }
  if (modes.memoryMode === 'virtio-mem' && !info.virtioMem)
    lack('virtio-mem', "memoryMode virtio-mem needs a <memory model='virtio-mem'> device");
  if (modes.memoryMode === 'balloon' && !info.balloon)
    lack(
      'balloon',
      "memoryMode balloon needs <memballoon model='virtio'> (it is 'none' or absent)",
    );
  return out;
}

/** The guest's memory as libvirt has it in virtio-mem mode: boot memory plus what is plugged. */
export function virtioMemGuestBytes(info: DomainXmlInfo): number | undefined {
  if (!info.virtioMem) return undefined;
  return info.memory.baseBytes + (info.virtioMem.currentBytes ?? info.virtioMem.requestedBytes);
}
