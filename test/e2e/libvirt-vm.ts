/**
 * The real-guest test's image booted by the machine's real libvirtd (libvirt.e2e.test.ts):
 * the domain is docs/libvirt/nbguest-tcg.xml, the operator's documented XML, with only its
 * name ("nbguest", which every path in it contains) and its 9p share's directory replaced.
 *
 * Files, all in /var/lib/libvirt/images/<name>/ (libvirt's DAC driver gives kernel, initrd
 * and disk to libvirt-qemu while the domain runs): the image's vmlinuz and initrd.img
 * copied (small), a qcow2 overlay on the cached rootfs.ext4 (its backing file, read only),
 * and the console log. The test runner's socket is /var/lib/libvirt/qemu/<name>.test.sock
 * (the XML's `<source mode='bind'>`). Everything here is made under the domain's own name,
 * which holds the test's pid, and removed by cleanup(); nothing else is touched.
 */
import { existsSync, promises as fsp } from 'fs';
import * as path from 'path';
import { REPO, meminfoKiB, runFile } from './scenario';
import { GuestRunner, type GuestShell, type RunResult } from './vm';

export const URI = 'qemu:///system';
export const DOMAIN_XML = path.join(REPO, 'docs/libvirt/nbguest-tcg.xml');
const DOC_NAME = 'nbguest';
const DOC_SHARE = `/var/lib/libvirt/images/${DOC_NAME}/share`;

/** Where the projects' workload writes its `<name>.started` markers in the guest. */
export const LIBVIRT_MARKERS = '/var/lib/nestbroker/e2e-markers';
/** Two small projects: the libvirt real-guest test's and the removal bench's. */
export const LIBVIRT_PROJECTS = [
  { name: 'web', priority: 50, holdMiB: 16, min: '32MiB', max: '96MiB' },
  { name: 'batch', priority: 10, holdMiB: 16, min: '48MiB', max: '128MiB' },
] as const;

export type CpuMode = 'unplug' | 'quota';
export type MemoryMode = 'virtio-mem' | 'balloon';

/** guest.yaml: the two projects; `memoryMiB` is the allocation the host broker books. */
export function libvirtGuestYaml(memoryMiB: number): string {
  const projects = LIBVIRT_PROJECTS.map(
    (p) => `  - name: ${p.name}
    priority: ${p.priority}
    memory: { min: ${p.min}, max: ${p.max} }
    cpu: { min: 0.25, max: 2 }
    stop: { signal: SIGTERM, gracePeriod: 20s }
    restartOnRestore: true
    command:
      argv: ["/usr/bin/node", "/mnt/code/test/e2e/guest/workload.js", "${p.name}", "${p.holdMiB}", "${LIBVIRT_MARKERS}"]`,
  ).join('\n');
  return `guest: vm1
resources: { cpus: 2, memory: ${memoryMiB}MiB }
reserve: { memory: 160MiB, cpus: 0 }
upstream: { transport: virtio-serial, path: /dev/virtio-ports/org.nestbroker.0 }
projects:
${projects}
`;
}

/** host.yaml for HostBroker.start: the domain's name is all it says of the VM. */
export function libvirtHostYaml(domain: string, cpuMode: CpuMode, memoryMode: MemoryMode) {
  return (stateDir: string, socket: string) => `hypervisor: libvirt
stateDir: ${stateDir}
socket: ${socket}
guests:
  - name: vm1
    domain: ${domain}
    priority: 10
    floor: { cpus: 1, memory: 256MiB }
    cpuMode: ${cpuMode}
    memoryMode: ${memoryMode}
    confirmTimeout: 30s
`;
}

/** One timed virsh call: what it printed and how long it took. */
export interface VirshRun {
  out: string;
  ms: number;
}

export class LibvirtVm implements GuestShell {
  readonly dir: string;
  readonly testSocket: string;
  readonly timings: Record<string, number> = {};
  /** When the last `virsh start` returned (epoch ms): libvirt has started the domain. */
  startReturnedAt?: number;
  runner?: GuestRunner;
  private boots = 0;

  private constructor(
    readonly name: string,
    readonly outDir: string,
  ) {
    this.dir = `/var/lib/libvirt/images/${name}`;
    this.testSocket = `/var/lib/libvirt/qemu/${name}.test.sock`;
  }

  /** `virsh -c qemu:///system ARGS`, bounded; rejects with virsh's stderr. */
  static async virsh(args: string[], timeoutMs = 120_000): Promise<VirshRun> {
    const t0 = Date.now();
    const out = await runFile('virsh', ['-c', URI, ...args], timeoutMs);
    return { out, ms: Date.now() - t0 };
  }

  virsh(args: string[], timeoutMs?: number): Promise<VirshRun> {
    return LibvirtVm.virsh(args, timeoutMs);
  }

  /** The documented XML with this domain's name and share: what is defined. */
  static domainXml(doc: string, name: string, shareDir: string): string {
    if (!doc.includes(DOC_SHARE)) throw new Error(`${DOMAIN_XML} has no share ${DOC_SHARE}`);
    return doc.split(DOC_SHARE).join(shareDir).split(DOC_NAME).join(name);
  }

  /**
   * Makes the files and defines the domain (not started). `virsh define` probes QEMU's
   * capabilities the first time after libvirtd started: ~60 s measured here.
   */
  static async define(o: {
    name: string;
    imageDir: string;
    outDir: string;
    shareDir: string;
  }): Promise<LibvirtVm> {
    const vm = new LibvirtVm(o.name, o.outDir);
    await fsp.mkdir(o.outDir, { recursive: true });
    await fsp.mkdir(vm.dir, { recursive: true });
    for (const f of ['vmlinuz', 'initrd.img'])
      await fsp.copyFile(path.join(o.imageDir, f), path.join(vm.dir, f));
    await runFile(
      'qemu-img',
      [
        'create',
        '-q',
        '-f',
        'qcow2',
        '-F',
        'raw',
        '-b',
        path.join(o.imageDir, 'rootfs.ext4'),
        path.join(vm.dir, 'overlay.qcow2'),
      ],
      60_000,
    );
    const xml = LibvirtVm.domainXml(await fsp.readFile(DOMAIN_XML, 'utf8'), o.name, o.shareDir);
    const file = path.join(o.outDir, `${o.name}.xml`);
    await fsp.writeFile(file, xml);
    vm.timings.defineMs = (await LibvirtVm.virsh(['define', file], 300_000)).ms;
    return vm;
  }

  /** `virsh start`, then waits until the runner in the guest answers. */
  async start(bootTimeoutMs = 300_000): Promise<void> {
    const t0 = Date.now();
    this.runner?.close();
    this.runner = undefined;
    const n = ++this.boots;
    this.timings[`start${n}Ms`] = (await this.virsh(['start', this.name], 120_000)).ms;
    this.startReturnedAt = Date.now();
    this.runner = await GuestRunner.connect(
      this.testSocket,
      path.join(this.outDir, 'runner-transcript.jsonl'),
      bootTimeoutMs,
    );
    this.timings[`boot${n}Ms`] = Date.now() - t0;
  }

  run(cmd: string, timeoutMs = 60_000): Promise<RunResult> {
    if (!this.runner) throw new Error('guest runner is not connected');
    return this.runner.run(cmd, timeoutMs);
  }

  sh(cmd: string, timeoutMs = 60_000): Promise<string> {
    if (!this.runner) throw new Error('guest runner is not connected');
    return this.runner.sh(cmd, timeoutMs);
  }

  /** The live XML. */
  async dumpxml(): Promise<string> {
    return (await this.virsh(['dumpxml', this.name], 30_000)).out;
  }

  /** Until virtio-mem's <current> equals its <requested> in the live XML (bounded); ms. */
  async virtioMemSettled(timeoutMs = 240_000): Promise<number> {
    const t0 = Date.now();
    for (;;) {
      const xml = await this.dumpxml();
      const req = /<requested unit='KiB'>(\d+)<\/requested>/.exec(xml)?.[1];
      const cur = /<current unit='KiB'>(\d+)<\/current>/.exec(xml)?.[1];
      if (req !== undefined && req === cur) return Date.now() - t0;
      if (Date.now() - t0 > timeoutMs)
        throw new Error(`virtio-mem did not settle: requested ${req} KiB, current ${cur} KiB`);
      await new Promise((r) => setTimeout(r, 1000));
    }
  }

  /** The guest's MemTotal (KiB). */
  async memTotalKiB(): Promise<number> {
    return meminfoKiB(await this.sh('cat /proc/meminfo'), 'MemTotal');
  }

  /** `virsh destroy` (the guest's power cut), if it runs. */
  async destroy(): Promise<void> {
    this.runner?.close();
    this.runner = undefined;
    const state = await this.virsh(['domstate', this.name], 30_000).catch(() => null);
    if (state && /running|paused/.test(state.out))
      await this.virsh(['destroy', this.name], 60_000).catch(() => undefined);
  }

  /**
   * Saves the logs (the guest's, when it still answers; libvirt's log of the domain; the
   * console), then destroys and undefines the domain and removes every file made for it.
   */
  async cleanup(): Promise<void> {
    if (this.runner) await this.runner.collectLogs(this.outDir).catch(() => undefined);
    await this.destroy();
    for (const [from, to] of [
      [`/var/log/libvirt/qemu/${this.name}.log`, 'libvirt-domain.log'],
      [path.join(this.dir, 'console.log'), 'console.log'],
    ])
      await fsp.copyFile(from, path.join(this.outDir, to)).catch(() => undefined);
    await this.virsh(['undefine', this.name], 60_000).catch(() => undefined);
    await fsp.rm(this.dir, { recursive: true, force: true });
    await fsp.rm(`/var/log/libvirt/qemu/${this.name}.log`, { force: true });
    if (existsSync(this.testSocket)) await fsp.rm(this.testSocket, { force: true });
  }
}
