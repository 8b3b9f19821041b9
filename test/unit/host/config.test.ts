import { validateHostConfig, loadHostConfig } from '../../../agent/host/config';
import { isNestError, type NestError } from '../../../agent/common/errors';
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';

const good = {
  stateDir: '/var/lib/nestbroker/host',
  cgroup: { root: 'machine.slice' },
  guests: [
    {
      name: 'vm1',
      priority: 10,
      allocation: { cpus: 2, memory: '4GiB' },
      floor: { cpus: 0.5, memory: '1GiB' },
      channel: {
        transport: 'unix',
        path: '/var/lib/libvirt/qemu/channel/target/vm1.org.nestbroker.0',
      },
      cgroup: 'machine-qemu\\x2d1\\x2dvm1.scope',
      qmp: '/run/nestbroker/vm1.qmp',
    },
    {
      name: 'vm2',
      priority: 20,
      allocation: { cpus: '1.5', memory: 2147483648 },
      channel: {
        transport: 'tls',
        host: '10.0.0.2',
        port: 7443,
        cert: 'h.crt',
        key: 'h.key',
        ca: 'ca.crt',
      },
    },
  ],
};

function problemsOf(raw: unknown): NestError['problems'] {
  try {
    validateHostConfig(raw, '/etc/nestbroker');
  } catch (e) {
    if (isNestError(e, 'CONFIG_INVALID')) return e.problems;
    throw e;
  }
  throw new Error('expected CONFIG_INVALID');
}

test('a good config: units parsed, defaults filled, relative paths resolved, result frozen', () => {
  const c = validateHostConfig(good, '/etc/nestbroker');
  expect(c.socket).toBe('/run/nestbroker/host.sock');
  expect(c.socketMode).toBe(0o660);
  expect(c.trigger.enabled).toBe(false);
  expect(c.guests[0]).toMatchObject({
    allocation: { cpus: 2, memoryBytes: 4 * 1024 ** 3 },
    floor: { cpus: 0.5, memoryBytes: 1024 ** 3 },
    cgroup: 'machine-qemu\\x2d1\\x2dvm1.scope',
  });
  expect(c.guests[1].floor).toEqual({ cpus: 0, memoryBytes: 0 });
  expect(c.guests[1].channel).toMatchObject({
    cert: '/etc/nestbroker/h.crt',
    ca: '/etc/nestbroker/ca.crt',
  });
  expect(Object.isFrozen(c.guests[0].allocation)).toBe(true);
});

test('every problem at once, each naming its field and value: an unknown key hides nothing', () => {
  const bad = structuredClone(good) as Record<string, unknown> & {
    guests: Record<string, unknown>[];
  };
  bad.colour = 'blue';
  bad.guests[0].floor = { cpus: 3, memory: '1GiB' };
  bad.guests[0].allocation = { cpus: 2, memory: '4 parsecs' };
  bad.guests[1].name = 'vm1';
  bad.guests[1].cgroup = '../escape';
  bad.trigger = { enabled: true, for: 'soon' };
  const fields = problemsOf(bad).map((p) => [p.field, p.value]);
  // One pass finds them all: the unknown key, the single values and the cross checks.
  expect(fields).toEqual(
    expect.arrayContaining([
      ['colour', 'blue'],
      ['guests[0].allocation.memory', '4 parsecs'],
      ['guests[0].floor.cpus', 3],
      ['guests[1].name', 'vm1'],
      ['guests[1].cgroup', '../escape'],
      ['trigger.for', 'soon'],
      ['trigger', expect.anything()],
      ['trigger.step', undefined],
    ]),
  );
  expect(fields).toHaveLength(8);
});

test('a misspelt key is named with the nearest known key, and the keys known at its place', () => {
  const bad = structuredClone(good) as Record<string, unknown> & {
    guests: Record<string, unknown>[];
  };
  bad.stateDri = '/x';
  bad.guests[0].prority = 3;
  bad.guests[1].channel = { ...(bad.guests[1].channel as object), cafile: 'ca.crt' };
  const problems = problemsOf(bad);
  const byField = Object.fromEntries(problems.map((p) => [p.field, p]));
  expect(byField.stateDri).toMatchObject({
    value: '/x',
    message: expect.stringMatching(/not a known key \(did you mean "stateDir"\?\)/),
  });
  expect(byField['guests[0].prority'].message).toMatch(/did you mean "priority"/);
  // Inside a tls channel the keys known are the tls ones.
  expect(byField['guests[1].channel.cafile'].message).toMatch(
    /known here: transport, host, port, cert, key, ca, servername/,
  );
});

test('wrong shapes are reported by path: a tls channel without its key, a bad transport', () => {
  const bad = structuredClone(good) as { guests: Record<string, unknown>[] };
  bad.guests[1].channel = { transport: 'tls', host: 'h', port: 1, cert: 'c', ca: 'a' };
  bad.guests[0].channel = { transport: 'tcp', host: 'h' };
  const fields = problemsOf(bad).map((p) => p.field);
  expect(fields).toEqual(
    expect.arrayContaining(['guests[1].channel.key', 'guests[0].channel.transport']),
  );
});

test('two guests on one channel socket are refused', () => {
  const bad = structuredClone(good) as { guests: Record<string, unknown>[] };
  bad.guests[1].channel = { ...(bad.guests[0].channel as object) };
  expect(problemsOf(bad).map((p) => p.field)).toEqual(['guests[1].channel']);
});

test('loadHostConfig reads YAML and reports an unreadable file with its own code', async () => {
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'nb-hostcfg-'));
  try {
    const f = path.join(dir, 'host.yaml');
    await fs.writeFile(
      f,
      'guests:\n  - name: vm1\n    priority: 1\n    allocation: {cpus: 1, memory: 1GiB}\n    channel: {transport: unix, path: ch.sock}\n',
    );
    const c = await loadHostConfig(f);
    expect(c.guests[0].channel).toEqual({ transport: 'unix', path: path.join(dir, 'ch.sock') });
    await expect(loadHostConfig(path.join(dir, 'missing.yaml'))).rejects.toMatchObject({
      code: 'CONFIG_UNREADABLE',
    });
  } finally {
    await fs.rm(dir, { recursive: true, force: true });
  }
});

test('metrics: off when absent; a bad host, port or key is named with its value', () => {
  expect(validateHostConfig(good, '/etc/nestbroker').metrics).toBeUndefined();
  expect(
    validateHostConfig({ ...good, metrics: { host: '127.0.0.1', port: 9464 } }, '/etc').metrics,
  ).toEqual({ host: '127.0.0.1', port: 9464 });
  const problems = problemsOf({ ...good, metrics: { host: 'a b', port: 70000, path: '/x' } });
  expect(problems.map((p) => p.field).sort()).toEqual([
    'metrics.host',
    'metrics.path',
    'metrics.port',
  ]);
  expect(problems.find((p) => p.field === 'metrics.port')?.value).toBe(70000);
});

test('trigger.giveBack: off when absent; parsed with its default; the band and a threshold are required', () => {
  const trigger = {
    enabled: true,
    memoryAvailableBelow: '2GiB',
    memoryPsiAbove: 20,
    step: { memory: '256MiB' },
  };
  expect(validateHostConfig({ ...good, trigger }, '/etc').trigger.giveBack).toBeUndefined();
  expect(
    validateHostConfig(
      { ...good, trigger: { ...trigger, giveBack: { memoryAvailableAbove: '4GiB' } } },
      '/etc',
    ).trigger.giveBack,
  ).toEqual({ memoryAvailableAboveBytes: 4 * 1024 ** 3, afterMs: 300_000 });
  const bad = (giveBack: unknown) =>
    problemsOf({ ...good, trigger: { ...trigger, giveBack } }).map((p) => [p.field, p.value]);
  expect(bad({ after: '1m' })).toEqual([['trigger.giveBack', { after: '1m' }]]);
  expect(bad({ memoryAvailableAbove: '1GiB', memoryPsiBelow: 25 })).toEqual([
    ['trigger.giveBack.memoryAvailableAbove', '1GiB'],
    ['trigger.giveBack.memoryPsiBelow', 25],
  ]);
});

test('hypervisor: libvirt: the domain is named, what libvirt gives is refused, every problem at once', () => {
  const cfg = validateHostConfig({
    hypervisor: 'libvirt',
    guests: [
      { name: 'vm1', priority: 1 },
      { name: 'vm2', priority: 2, domain: 'prod-db' },
    ],
  });
  expect(cfg.hypervisor).toEqual({
    type: 'libvirt',
    uri: 'qemu:///system',
    timeoutMs: 60_000,
    afterRestart: 'reapply',
    reapplyDeadlineMs: 600_000,
  });
  expect(cfg.guests.map((g) => [g.channel, g.libvirt])).toEqual([
    [
      { transport: 'libvirt', domain: 'vm1' },
      { domain: 'vm1', cpuMode: 'unplug', memoryMode: 'virtio-mem', confirmTimeoutMs: 60_000 },
    ],
    [
      { transport: 'libvirt', domain: 'prod-db' },
      { domain: 'prod-db', cpuMode: 'unplug', memoryMode: 'virtio-mem', confirmTimeoutMs: 60_000 },
    ],
  ]);

  let err: NestError | undefined;
  try {
    validateHostConfig({
      hypervisor: 'libvirt',
      guests: [
        {
          name: 'vm1',
          priority: 1,
          channel: { transport: 'unix', path: '/run/nestbroker/channel/vm1.sock' },
          qmp: '/run/nestbroker/qmp/vm1.sock',
          cpuMode: 'hotplug',
        },
        { name: 'vm2', priority: 1, domain: 'vm1' },
        { name: 'vm3', priority: 1, domain: 'bad/name' },
      ],
    });
  } catch (e) {
    if (isNestError(e)) err = e;
  }
  expect(err?.code).toBe('CONFIG_INVALID');
  // Every problem at once: the schema's (a mode that does not exist, a domain name with a
  // "/") and the cross checks' (what libvirt gives typed again, one domain for two guests).
  expect(err?.problems.map((p) => p.field).sort()).toEqual([
    'guests[0].channel',
    'guests[0].cpuMode',
    'guests[0].qmp',
    'guests[1].domain',
    'guests[2].domain',
  ]);

  // And the other way round: libvirt keys need hypervisor: libvirt; qemu needs its channel.
  try {
    validateHostConfig({
      libvirt: { uri: 'qemu:///session' },
      guests: [{ name: 'vm1', priority: 1, memoryMode: 'balloon' }],
    });
  } catch (e) {
    if (isNestError(e)) err = e;
  }
  expect(err?.problems.map((p) => p.field).sort()).toEqual([
    'guests[0].allocation',
    'guests[0].channel',
    'guests[0].memoryMode',
    'libvirt',
  ]);
});
