/**
 * A recording stand-in for virsh (a VirshRunner) that answers from the recorded output in
 * test/fixtures/libvirt/: the live XML of the running TCG domain `nbfix`, with its vCPU
 * count, the virtio-mem device's <requested>/<current>, the balloon's `actual` and the
 * global quota set to what the simulated domain has now. What the guest does with a
 * request (unplug it at once, later, partly, never) is the test's choice: `guest`.
 */
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { NestError } from '../../../../agent/common/errors';
import type { VirshResult, VirshRunner } from '../../../../agent/host/libvirt/virsh';

export const FIXTURES = path.join(__dirname, '..', '..', '..', 'fixtures', 'libvirt');
const KiB = 1024;

export async function fixture(name: string): Promise<string> {
  return fs.readFile(path.join(FIXTURES, name), 'utf8');
}

export interface SimDomain {
  state: 'running' | 'shut off';
  vcpus: number;
  requestedKiB: number;
  currentKiB: number;
  balloonKiB: number;
  quota: number;
  /**
   * The vCPUs QEMU still runs, as `domstats --vcpu` lists them (default: libvirt's
   * enabled ones). Under TCG QEMU ejects a vCPU that libvirt's XML keeps listing.
   */
  qemuVcpus?: number;
  /**
   * How `domstats --vcpu` shows a vCPU QEMU ejected: not listed (default), or as measured
   * under TCG with libvirt 9.0 (test/fixtures/libvirt/domstats-tcg-ejected.txt): still
   * listed, `state=1`, its thread's time, wait and delay 0; the vCPUs QEMU runs then show
   * time and delay above 0.
   */
  ejectedListed?: boolean;
}

export interface GuestBehaviour {
  /** After setvcpus: what the enabled count becomes, and whether virsh says timed out. */
  setvcpus?: (want: number, d: SimDomain) => { timedOut?: boolean; error?: string };
  /** Called at each read: lets the guest move `currentKiB` / `vcpus` over time. */
  tick?: (d: SimDomain) => void;
  /** After setmem: the guest's balloon driver (absent: actual never moves). */
  setmem?: (wantKiB: number, d: SimDomain) => void;
}

export class FakeVirsh {
  readonly calls: string[][] = [];
  readonly d: SimDomain = {
    state: 'running',
    vcpus: 2,
    requestedKiB: 131072,
    currentKiB: 131072,
    balloonKiB: 131072,
    quota: -1,
  };
  guest: GuestBehaviour = {};
  /** Rewrites the live XML as served (a domain lacking a device: domain-xml.test.ts LACKS). */
  edit: (xml: string) => string = (xml) => xml;

  private constructor(
    private readonly live: string,
    private readonly shutoff: string,
    private readonly inactive: string,
  ) {}

  static async create(): Promise<FakeVirsh> {
    return new FakeVirsh(
      await fixture('live-running.xml'),
      await fixture('shutoff.xml'),
      await fixture('inactive.xml'),
    );
  }

  /** The live XML of the fixture with the simulated values written in. */
  liveXml(): string {
    const d = this.d;
    const vcpus = [0, 1, 2, 3]
      .map(
        (id) =>
          `    <vcpu id='${id}' enabled='${id < d.vcpus ? 'yes' : 'no'}' hotpluggable='${id === 0 ? 'no' : 'yes'}'/>`,
      )
      .join('\n');
    return this.live
      .replace(
        "<vcpu placement='static' current='2'>4</vcpu>",
        `<vcpu placement='static' current='${d.vcpus}'>4</vcpu>`,
      )
      .replace(/<vcpus>[\s\S]*?<\/vcpus>/, `<vcpus>\n${vcpus}\n  </vcpus>`)
      .replace(
        "<requested unit='KiB'>131072</requested>",
        `<requested unit='KiB'>${d.requestedKiB}</requested>`,
      )
      .replace("<current unit='KiB'>0</current>", `<current unit='KiB'>${d.currentKiB}</current>`);
  }

  runner: VirshRunner = async (args): Promise<VirshResult> => {
    const a = args.slice(2); // -c uri
    this.calls.push([...a]);
    const ok = (stdout = ''): VirshResult => ({ stdout, stderr: '' });
    const fail = (msg: string): never => {
      throw new NestError('LIBVIRT_ERROR', `virsh ${a.join(' ')}: exit 1: ${msg}`);
    };
    this.guest.tick?.(this.d);
    const val = (flag: string): string => a[a.indexOf(flag) + 1];
    switch (a[0]) {
      case 'list':
        return ok(this.d.state === 'running' ? 'nbfix\n\n' : '\n');
      case 'domstate':
        return ok(`${this.d.state}\n\n`);
      case 'dumpxml':
        if (a.includes('--inactive')) return ok(this.inactive);
        return ok(this.d.state === 'running' ? this.edit(this.liveXml()) : this.shutoff);
      case 'setvcpus': {
        const want = Number(val('--count'));
        const r = this.guest.setvcpus?.(want, this.d) ?? {};
        if (r.error) fail(r.error);
        if (r.timedOut)
          fail(
            'error: operation failed: vcpu unplug request timed out. Unplug result must be manually inspected in the domain',
          );
        return ok();
      }
      case 'schedinfo': {
        if (a.includes('--set'))
          this.d.quota = Number(a.find((x) => x.startsWith('global_quota='))!.split('=')[1]);
        return ok(
          `Scheduler      : posix\ncpu_shares     : 1024\nglobal_period  : 100000\nglobal_quota   : ${this.d.quota}\n`,
        );
      }
      case 'update-memory-device': {
        this.d.requestedKiB = Number(val('--requested-size').replace(/KiB$/, ''));
        return ok();
      }
      case 'setmem':
        this.guest.setmem?.(Number(val('--size').replace(/KiB$/, '')), this.d);
        return ok();
      case 'domstats': {
        // The recorded format (test/fixtures/libvirt/domstats.txt): a vCPU QEMU no longer
        // runs is not listed.
        const n = this.d.qemuVcpus ?? this.d.vcpus;
        const lines = [`Domain: 'nbfix'`, `  vcpu.current=${this.d.vcpus}`, '  vcpu.maximum=4'];
        if (this.d.ejectedListed)
          for (let i = 0; i < this.d.vcpus; i++)
            lines.push(
              `  vcpu.${i}.state=1`,
              `  vcpu.${i}.time=${i < n ? 15090000000 : 0}`,
              `  vcpu.${i}.wait=0`,
              `  vcpu.${i}.delay=${i < n ? 36554918739 : 0}`,
            );
        else for (let i = 0; i < n; i++) lines.push(`  vcpu.${i}.state=1`, `  vcpu.${i}.time=0`);
        return ok(lines.join('\n') + '\n\n');
      }
      case 'dommemstat':
        return ok(`actual ${this.d.balloonKiB}\nlast_update 0\nrss 48252\n\n`);
      default:
        return fail(`unknown command ${a[0]}`);
    }
  };
}

export const MiB = 1024 * KiB;

/**
 * The recorded live XML (live-running.xml) with one prerequisite taken out, each as an
 * operator would leave it out of the domain: what `missingPrerequisites` must name.
 */
export const LACKS = {
  channel: (xml: string) => cut(xml, "<channel type='unix'>", '</channel>'),
  acpi: (xml: string) => cut(xml, '<acpi/>', ''),
  'hotpluggable-vcpus': (xml: string) => xml.replaceAll("hotpluggable='yes'", "hotpluggable='no'"),
  'virtio-mem': (xml: string) => cut(xml, "<memory model='virtio-mem'>", '</memory>'),
  balloon: (xml: string) => cut(xml, "<memballoon model='virtio'>", '</memballoon>'),
} as const;

/**
 * The `<metadata>` block as `virsh dumpxml` showed it after
 * `virsh metadata --uri https://nestbroker.invalid/xmlns/guest/1 --key nestbroker --set
 * "<guest><priority>10</priority><floor cpus='1' memory='64MiB'/></guest>" --live`
 * (test/fixtures/libvirt/README.md), with `inner` in place of its two settings.
 */
export function withMetadata(
  xml: string,
  inner = `<nestbroker:priority>10</nestbroker:priority>
      <nestbroker:floor cpus="1" memory="64MiB"/>`,
  open = '<nestbroker:guest xmlns:nestbroker="https://nestbroker.invalid/xmlns/guest/1">',
  close = '</nestbroker:guest>',
): string {
  const block = `  <metadata>
    ${open}
      ${inner}
    ${close}
  </metadata>
`;
  const at = xml.indexOf('  <maxMemory');
  if (at < 0) throw new Error('the fixture has no <maxMemory>');
  return xml.slice(0, at) + block + xml.slice(at);
}

/** `xml` without the first element that starts with `open` and ends with `close`. */
function cut(xml: string, open: string, close: string): string {
  const i = xml.indexOf(open);
  if (i < 0) throw new Error(`the fixture has no ${open}`);
  const j = close ? xml.indexOf(close, i) + close.length : i + open.length;
  return xml.slice(0, i) + xml.slice(j);
}

/**
 * A stand-in for `virsh event --loop --all` (LibvirtDomains.follow's `binary`): prints the
 * event lines recorded from the real libvirtd (test/fixtures/libvirt/events.txt), then
 * waits as virsh does, until it is stopped. Written into `dir`; returns its path.
 */
export async function recordedEventsBinary(dir: string): Promise<string> {
  const bin = path.join(dir, 'virsh-events');
  await fs.writeFile(
    bin,
    `#!/bin/sh\ncat '${path.join(FIXTURES, 'events.txt')}'\nexec sleep 600\n`,
    { mode: 0o755 },
  );
  return bin;
}
