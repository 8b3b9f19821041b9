/**
 * The host broker against the REAL libvirtd of this machine (docs/libvirt.md): a TCG
 * domain (`<domain type='qemu'>`, test/fixtures/libvirt/nbfix-define.xml: the channel,
 * ACPI, hotpluggable vCPUs, a virtio-mem device and a balloon; no disk and no guest OS, so
 * nothing in the guest answers) is defined and started through virsh, and the host broker
 * (`startHost`, as `nestbroker host` runs it) with `hypervisor: libvirt` and a config that
 * names only the domain:
 *
 *   - connects to the channel socket whose path it read from the live XML, under
 *     libvirt's own /var/lib/libvirt/qemu/channel/target/;
 *   - follows `virsh event --loop --all` (restarted when killed) so that after
 *     `virsh destroy` + `virsh start` it connects to the new path with no config change,
 *     and refuses a notice while the domain is down with DOMAIN_DOWN;
 *   - actuates through virsh only: a CPU quota through schedinfo (done, the books equal
 *     libvirt's quota), a balloon the guest has no driver for (failed, never done, the
 *     books unchanged); vCPU hot-plug and the unplug QEMU refuses without a guest OS, and
 *     a virtio-mem request nothing plugs, straight through the actuator.
 *
 * libvirtd and virtlogd are started when not running and stopped by pid at the end; the
 * domain is destroyed and undefined at the end, also on failure. Figures (virsh define,
 * start, setvcpus, setmem, update-memory-device) are printed for docs/libvirt.md.
 */
import { execFile } from 'node:child_process';
import { promises as fs } from 'node:fs';
import { promisify } from 'node:util';
import os from 'node:os';
import path from 'node:path';
import { Writable } from 'node:stream';
import pino from 'pino';
import { silentLogger } from '../../../agent/common/log';
import { validateHostConfig } from '../../../agent/host/config';
import { LibvirtActuator } from '../../../agent/host/libvirt/actuator';
import { LibvirtDomains, resolveAllocations } from '../../../agent/host/libvirt/domains';
import { parseDomainXml } from '../../../agent/host/libvirt/domain-xml';
import { NESTBROKER_XMLNS } from '../../../agent/host/libvirt/guest-metadata';
import { Virsh } from '../../../agent/host/libvirt/virsh';
import { startHost, type RunningHost } from '../../../agent/host/main';
import { NESTCTL, waitFor } from '../../../demo/stack';
import { ensureLibvirtd, stopStarted, type StartedDaemon } from '../../helpers/libvirt';
import { failure } from '../../helpers/failure';

jest.setTimeout(900_000);

const MiB = 1024 * 1024;
const name = `nbit-${process.pid}`;
/** A transient domain lacking every prerequisite (test/fixtures/libvirt/nbbare-define.xml). */
const bare = `nbbare-${process.pid}`;
const CHANNEL_DIR = '/var/lib/libvirt/qemu/channel/target';
// A bound for a hung libvirtd, not for a slow one: the first `virsh define` after libvirtd
// starts probes QEMU's capabilities (51–98 s measured here, docs/libvirt.md "Figures"),
// and took over 120 s on this 2-core machine with two QEMU guests running beside it.
const virsh = new Virsh({ timeoutMs: 300_000 });
const figures: Record<string, number> = {};
let started: StartedDaemon[] = [];
let dir: string;
let host: RunningHost | null = null;

async function timed<T>(what: string, fn: () => Promise<T>): Promise<T> {
  const t0 = Date.now();
  const v = await fn();
  figures[what] = Date.now() - t0;
  return v;
}

async function liveId(): Promise<number> {
  return parseDomainXml(await virsh.dumpxml(name)).id!;
}

beforeAll(async () => {
  dir = await fs.mkdtemp(path.join(os.tmpdir(), 'nb-libvirt-'));
  started = await ensureLibvirtd(120_000);
  const xml = (
    await fs.readFile(path.join(__dirname, '../../fixtures/libvirt/nbfix-define.xml'), 'utf8')
  ).replace('<name>nbfix</name>', `<name>${name}</name>`);
  const file = path.join(dir, `${name}.xml`);
  await fs.writeFile(file, xml);
  const bareFile = path.join(dir, `${bare}.xml`);
  await fs.writeFile(
    bareFile,
    (
      await fs.readFile(path.join(__dirname, '../../fixtures/libvirt/nbbare-define.xml'), 'utf8')
    ).replace('<name>nbbare</name>', `<name>${bare}</name>`),
  );
  // Both at once: each costs 30-60 s here (docs/libvirt.md, "Figures"); `create` is define
  // and start in one call, and the transient domain is gone with its `destroy`.
  await Promise.all([
    timed('virsh define', async () => {
      await virsh.run(['define', '--file', file]);
    }),
    timed('virsh create (bare, alongside define)', async () => {
      await virsh.run(['create', '--file', bareFile]);
    }),
  ]);
  await timed('virsh start', () => virsh.run(['start', '--domain', name]));
});

afterAll(async () => {
  try {
    await host?.stop();
  } finally {
    // By name whether or not our define or create returned: a call killed at its bound may
    // still be carried out by libvirtd (the name carries this run's pid: only ours).
    await virsh.run(['destroy', '--domain', name]).catch(() => undefined);
    await virsh.run(['undefine', '--domain', name]).catch(() => undefined);
    await virsh.run(['destroy', '--domain', bare]).catch(() => undefined);
    await stopStarted(started);
    await fs.rm(dir, { recursive: true, force: true });
    process.stdout.write(`libvirt figures (ms): ${JSON.stringify(figures)}\n`);
  }
});

test('the live XML gives the channel under libvirt’s own directory, vCPUs and devices; no taint', async () => {
  const info = parseDomainXml(await virsh.dumpxml(name));
  expect(info.channel?.path).toBe(`${CHANNEL_DIR}/domain-${info.id}-${name}/org.nestbroker.0`);
  expect((await fs.stat(info.channel!.path!)).isSocket()).toBe(true);
  expect(info).toMatchObject({
    type: 'qemu',
    acpi: true,
    vcpus: { max: 4, current: 2, hotpluggable: [1, 2, 3] },
    virtioMem: { sizeBytes: 256 * MiB, requestedBytes: 128 * MiB },
    balloon: { model: 'virtio' },
  });
  // No <qemu:commandline>, no monitor of our own: libvirt logs nothing about taint.
  const log = await fs.readFile(`/var/log/libvirt/qemu/${name}.log`, 'utf8');
  expect(log).toContain('qemu-system-x86_64');
  expect(log).not.toMatch(/taint/i);
});

test('the host broker connects to the channel libvirt chose; after destroy + start, to the new one', async () => {
  const cfg = validateHostConfig({
    hypervisor: 'libvirt',
    // A re-applied reclaim nobody answers (no guest OS) ends late soon.
    libvirt: { timeout: '120s', afterRestart: 'reapply', reapplyDeadline: '2s' },
    stateDir: path.join(dir, 'state'),
    socket: path.join(dir, 'host.sock'),
    reconnect: { min: '200ms', max: '30s' },
    guests: [{ name, priority: 1, cpuMode: 'quota', memoryMode: 'balloon', confirmTimeout: '5s' }],
  });
  const h = (host = await startHost(cfg, silentLogger()));
  const domains = h.domains!;
  // The allocation came from the persistent XML: 2 vCPUs, <currentMemory> 128 MiB.
  expect(h.broker.booksFor(name).allocation).toEqual({ cpus: 2, memoryBytes: 128 * MiB });
  const first = `${CHANNEL_DIR}/domain-${await liveId()}-${name}/org.nestbroker.0`;
  await waitFor(
    'the first channel',
    async () => domains.channels.get(name) === first,
    120_000,
    100,
  );

  // The event follower, killed by its pid, is started again.
  const events = (domains as unknown as { events: { pid?: number; restarts: number } }).events;
  const oldPid = events.pid!;
  process.kill(oldPid, 'SIGKILL');
  await waitFor('virsh event restarted', async () => events.restarts === 1 && events.pid, 60_000);
  expect(events.pid).not.toBe(oldPid);

  const lifecycle: string[] = [];
  domains.on('lifecycle', (e: { event: string }) => lifecycle.push(e.event));
  await virsh.run(['destroy', '--domain', name]);
  await waitFor('the Stopped event', async () => lifecycle.includes('Stopped'), 60_000);
  const down = await failure(
    h.broker.issue('reclaim', {
      guest: name,
      change: { cpus: 0.5, memoryBytes: 0 },
      deadlineMs: 1000,
    }),
  );
  expect(down.code).toBe('DOMAIN_DOWN');
  expect(h.broker.notices(name)).toEqual([]);

  await timed('virsh start (again)', () => virsh.run(['start', '--domain', name]));
  const second = `${CHANNEL_DIR}/domain-${await liveId()}-${name}/org.nestbroker.0`;
  expect(second).not.toBe(first);
  await waitFor('the new channel', async () => domains.channels.get(name) === second, 120_000, 100);
  expect(lifecycle).toContain('Started');

  // `nestctl guests` (the real CLI on the operator socket): the domain as libvirt has it.
  const nestctl = (...args: string[]) =>
    promisify(execFile)(process.execPath, [NESTCTL, '--socket', cfg.socket, ...args], {
      timeout: 120_000,
    });
  const [status] = JSON.parse((await nestctl('guests', '--json')).stdout) as {
    connected: boolean;
    domain: Record<string, unknown>;
  }[];
  expect(status.connected).toBe(false); // no guest OS, so no agent says hello
  expect(status.domain).toEqual({
    name,
    state: 'running',
    id: await liveId(),
    cpus: 2,
    memoryBytes: 128 * MiB,
    vcpus: { current: 2, max: 4 },
    channel: second,
  });
  expect((await nestctl('guests')).stdout).toContain(
    `${name}: running, 128MiB, 2 CPUs (2/4 vCPUs)`,
  );
});

test('actuation through virsh: a quota is done and booked as libvirt has it; a balloon nobody inflates is failed', async () => {
  const h = host!;
  // No guest agent answers (no guest OS): force, so the VM is actuated at the deadline.
  const cpu = await (
    await h.broker.issue('reclaim', {
      guest: name,
      change: { cpus: 0.5, memoryBytes: 0 },
      deadlineMs: 1,
      force: true,
    })
  ).done;
  expect({ state: cpu.state, actuation: cpu.actuation }).toMatchObject({
    state: 'done',
    actuation: { status: 'done' },
  });
  const sched = await virsh.schedinfo(name);
  expect(sched).toMatchObject({ global_quota: 150000, global_period: 100000 });
  expect(h.broker.booksFor(name)).toMatchObject({
    granted: { cpus: 1.5, memoryBytes: 128 * MiB },
    actuated: { cpus: 1.5, memoryBytes: 128 * MiB },
  });

  const mem = await (
    await h.broker.issue('reclaim', {
      guest: name,
      change: { cpus: 0, memoryBytes: 16 * MiB },
      deadlineMs: 1,
      force: true,
    })
  ).done;
  figures['setmem + 5 s confirm timeout'] =
    Date.parse(mem.actuation!.finishedAt) - Date.parse(mem.actuation!.startedAt);
  expect(mem.state).toBe('failed');
  expect(mem.error?.code).toBe('TIMEOUT');
  // libvirt was asked (setmem returned 0) but the guest's actual did not move: libvirt
  // updates <currentMemory> only when the balloon reports a change, so both still say 128.
  expect(mem.actuation?.steps).toEqual([
    expect.objectContaining({ call: 'setmem', want: 112 * MiB, got: 128 * MiB, confirmed: false }),
  ]);
  expect((await virsh.dommemstat(name)).actualBytes).toBe(128 * MiB);
  expect(parseDomainXml(await virsh.dumpxml(name)).memory.currentBytes).toBe(128 * MiB);
  expect(h.broker.booksFor(name).granted).toEqual({ cpus: 1.5, memoryBytes: 128 * MiB });

  const back = await (
    await h.broker.issue('restore', {
      guest: name,
      change: { cpus: 0.5, memoryBytes: 0 },
      deadlineMs: 1,
    })
  ).done;
  expect(back.actuation?.status).toBe('done');
  expect(await virsh.schedinfo(name)).toMatchObject({ global_quota: 200000 });
  expect(h.broker.booksFor(name).granted.cpus).toBe(2);
});

test('after destroy + start the reclaim in force is re-applied: journaled, sent at hello, nothing taken without an answer', async () => {
  const h = host!;
  const cpu = await (
    await h.broker.issue('reclaim', {
      guest: name,
      change: { cpus: 0.5, memoryBytes: 0 },
      deadlineMs: 1,
      force: true,
    })
  ).done;
  expect(cpu.state).toBe('done');
  expect(await virsh.schedinfo(name)).toMatchObject({ global_quota: 150000 });
  await virsh.run(['destroy', '--domain', name]);
  await timed('virsh start (re-apply)', () => virsh.run(['start', '--domain', name]));
  // libvirt starts it from its persistent XML: no quota. The broker follows and re-applies.
  expect(await virsh.schedinfo(name)).toMatchObject({ global_quota: -1 });
  const t0 = Date.now();
  await waitFor(
    'the re-applied reclaim',
    async () => h.broker.notices(name).some((r) => r.source === 'restart'),
    60_000,
    100,
  );
  figures['Started → re-applied reclaim journaled'] = Date.now() - t0;
  const again = h.broker.notices(name).find((r) => r.source === 'restart')!;
  expect(again.notice).toMatchObject({
    kind: 'reclaim',
    change: { cpus: 0.5, memoryBytes: 0 },
    allocation: { cpus: 1.5, memoryBytes: 128 * MiB },
  });
  expect(again.notice.reason).toMatch(/re-applies the reclaims in force: domain ".*" started/);
  // No guest OS says hello: by its (2 s) deadline it is late and nothing is taken.
  const end = await h.broker.wait(again.notice.id);
  expect({ state: end.state, code: end.error?.code, actuation: end.actuation }).toEqual({
    state: 'late',
    code: 'GUEST_LATE',
    actuation: undefined,
  });
  expect(await virsh.schedinfo(name)).toMatchObject({ global_quota: -1 });
  expect(h.broker.booksFor(name)).toMatchObject({
    granted: { cpus: 2, memoryBytes: 128 * MiB },
    actuated: { cpus: 2, memoryBytes: 128 * MiB },
  });
});

test('vCPU hot-plug and unplug, virtio-mem, straight through the actuator with real virsh', async () => {
  const cfg = await resolveAllocations(
    validateHostConfig({
      hypervisor: 'libvirt',
      guests: [
        { name, priority: 1, cpuMode: 'unplug', memoryMode: 'virtio-mem', confirmTimeout: '10s' },
      ],
    }),
    virsh,
  );
  const g = cfg.guests[0];
  const actuator = new LibvirtActuator(new LibvirtDomains(virsh, cfg.guests), silentLogger());
  const plug = await actuator.apply(g, { cpus: 3, memoryBytes: 128 * MiB }, 'up');
  figures['setvcpus 3 --live'] = plug.steps![0].callMs;
  expect(plug.status).toBe('done');
  expect(plug.actual?.cpus).toBe(3);

  // No guest OS has enabled ACPI CPU hot-unplug: QEMU refuses, virsh says why.
  const unplug = await actuator.apply(g, { cpus: 2, memoryBytes: 128 * MiB }, 'down');
  expect(unplug.status).toBe('failed');
  expect(unplug.errors[0]).toMatchObject({ step: 'cpus', code: 'LIBVIRT_ERROR' });
  expect(unplug.errors[0].message).toMatch(/unplug/);
  expect(unplug.actual?.cpus).toBe(3);

  // Nothing in the guest plugs virtio-mem memory: requested moves, current stays 0.
  const t0 = Date.now();
  const mem = await actuator.apply(g, { cpus: 3, memoryBytes: 192 * MiB }, 'up');
  figures['update-memory-device + confirm timeout'] = Date.now() - t0;
  expect(mem.status).toBe('failed');
  const vm = parseDomainXml(await virsh.dumpxml(name)).virtioMem!;
  expect(vm).toMatchObject({ requestedBytes: 64 * MiB, currentBytes: 0 });
  const call = mem.steps!.find((s) => s.call === 'update-memory-device')!;
  figures['update-memory-device --live'] = call.callMs;
});

test('a domain lacking every prerequisite: plan and reclaim refused naming each, nothing done', async () => {
  const cfg = validateHostConfig({
    hypervisor: 'libvirt',
    libvirt: { timeout: '120s' },
    stateDir: path.join(dir, 'bare-state'),
    socket: path.join(dir, 'bare.sock'),
    guests: [{ name: bare, priority: 1, cpuMode: 'unplug', memoryMode: 'virtio-mem' }],
  });
  const h = await startHost(cfg, silentLogger());
  try {
    const want = [
      'domain.channel',
      'domain.acpi',
      'domain.hotpluggable-vcpus',
      'domain.virtio-mem',
    ];
    // `nestctl plan` (the real CLI): refused, exit 5, each lack named; the guest not asked.
    const plan = await promisify(execFile)(
      process.execPath,
      [NESTCTL, '--socket', cfg.socket, 'plan', bare, '--cpus', '1', '--json'],
      { timeout: 120_000 },
    ).then(
      () => {
        throw new Error('nestctl plan should have been refused');
      },
      (e: { code: number; stdout: string }) => e,
    );
    expect(plan.code).toBe(5);
    const p = JSON.parse(plan.stdout) as {
      ok: boolean;
      code: string;
      problems: { field: string }[];
    };
    expect({ ok: p.ok, code: p.code, fields: p.problems.map((x) => x.field) }).toEqual({
      ok: false,
      code: 'PREREQUISITE_MISSING',
      fields: want,
    });
    const err = await failure(
      h.broker.issue('reclaim', {
        guest: bare,
        change: { cpus: 1, memoryBytes: 0 },
        deadlineMs: 60_000,
      }),
    );
    expect(err.code).toBe('PREREQUISITE_MISSING');
    expect(err.problems.map((x) => x.field)).toEqual(want);
    expect(h.broker.notices(bare)).toEqual([]);
    // Nothing was asked of libvirt: the domain has its 2 vCPUs still.
    expect(parseDomainXml(await virsh.dumpxml(bare)).vcpus.current).toBe(2);
    // The other modes' prerequisites, on the same domain: the channel and the balloon.
    const quota = await resolveAllocations(
      validateHostConfig({
        hypervisor: 'libvirt',
        guests: [{ name: bare, priority: 1, cpuMode: 'quota', memoryMode: 'balloon' }],
      }),
      virsh,
    );
    const actuator = new LibvirtActuator(new LibvirtDomains(virsh, quota.guests), silentLogger());
    const q = await failure(
      actuator.precheck(quota.guests[0], 'reclaim', { cpus: 1, memoryBytes: 64 * MiB }),
    );
    expect(q.problems.map((x) => x.field)).toEqual(['domain.channel', 'domain.balloon']);
  } finally {
    await h.stop();
  }
});

test('guests: auto: the domain becomes a guest when `virsh metadata` gives it settings; bad ones are logged and change nothing', async () => {
  // One broker on the domain's channel at a time: the first test's is done with it.
  await host?.stop();
  host = null;
  const lines: Record<string, unknown>[] = [];
  const log = pino(
    { level: 'info' },
    new Writable({
      write(chunk: Buffer, _enc, cb) {
        lines.push(JSON.parse(chunk.toString()) as Record<string, unknown>);
        cb();
      },
    }),
  );
  const cfg = validateHostConfig({
    hypervisor: 'libvirt',
    libvirt: { timeout: '120s', afterRestart: 'follow' },
    stateDir: path.join(dir, 'auto-state'),
    socket: path.join(dir, 'auto.sock'),
    reconnect: { min: '200ms', max: '5s' },
    guests: 'auto',
  });
  const h = await startHost(cfg, log);
  try {
    // The domain has the channel but no nestbroker metadata yet: skipped, named; the bare
    // domain has no channel: not ours.
    expect(h.config.guests.map((g) => g.name)).not.toContain(name);
    expect(lines).toContainEqual(
      expect.objectContaining({ domain: name, field: 'metadata.priority', level: 50 }),
    );
    const setMeta = (xml: string) =>
      timed('virsh metadata --set', () =>
        virsh.run([
          'metadata',
          '--domain',
          name,
          '--uri',
          NESTBROKER_XMLNS,
          '--key',
          'nestbroker',
          '--set',
          xml,
          '--live',
        ]),
      );
    // The events child may not be listening yet when startHost returns (virsh event says
    // nothing until an event): metadata in another namespace, until its event is seen.
    let probed = false;
    const onProbe = (e: { type: string; domain: string }) => {
      if (e.type === 'metadata-change' && e.domain === name) probed = true;
    };
    h.domains!.on('domain-event', onProbe);
    await waitFor(
      'the event stream',
      async () => {
        if (!probed)
          await virsh.run([
            'metadata',
            '--domain',
            name,
            '--uri',
            'https://nestbroker.invalid/xmlns/test-probe',
            '--key',
            'probe',
            '--set',
            '<probe/>',
            '--live',
          ]);
        return probed;
      },
      60_000,
      500,
    );
    h.domains!.off('domain-event', onProbe);
    await setMeta(
      "<guest><priority>5</priority><floor cpus='1' memory='64MiB'/><cpuMode>quota</cpuMode><memoryMode>balloon</memoryMode></guest>",
    );
    await waitFor(
      'the domain taken as a guest',
      async () => h.config.guests.some((g) => g.name === name),
      60_000,
      100,
    );
    expect(h.config.guests.find((g) => g.name === name)).toMatchObject({
      priority: 5,
      floor: { cpus: 1, memoryBytes: 64 * MiB },
      allocation: { cpus: 2, memoryBytes: 128 * MiB },
      libvirt: { domain: name, cpuMode: 'quota', memoryMode: 'balloon' },
    });
    expect(h.broker.guests().map((g) => g.name)).toContain(name);
    await waitFor(
      'the auto guest’s channel',
      async () => h.domains!.channels.get(name)?.startsWith(CHANNEL_DIR) ?? false,
      60_000,
      100,
    );

    // Bad settings: every problem logged with the domain, field and value; nothing changes.
    const before = lines.length;
    await setMeta('<guest><priority>lots</priority><cpuMode>sideways</cpuMode></guest>');
    await waitFor(
      'the skipped metadata logged',
      async () =>
        lines
          .slice(before)
          .some((l) => l.domain === name && l.code === 'CONFIG_INVALID' && l.problems === 2),
      60_000,
      100,
    );
    const problems = lines.slice(before).filter((l) => l.domain === name && l.field);
    expect(problems.map((l) => [l.field, l.value])).toEqual([
      ['metadata.priority', 'lots'],
      ['metadata.cpuMode', 'sideways'],
    ]);
    await h.auto!.done();
    expect(h.config.guests.find((g) => g.name === name)?.priority).toBe(5);
  } finally {
    await h.stop();
  }
});
