/**
 * `guests: auto` (docs/libvirt.md, "guests: auto"): a domain's nestbroker settings read
 * from its `<metadata>` (the block recorded from `virsh metadata … --set`, in the recorded
 * live XML: fake-virsh.ts withMetadata), checked by host.yaml's own schema at this
 * boundary: every problem at once, each naming the field and the value; a domain without
 * the channel is not a guest; the host config's `guests: auto` itself.
 */
import { promises as fs } from 'node:fs';
import path from 'node:path';
import { Writable } from 'node:stream';
import pino from 'pino';
import { isNestError } from '../../../../agent/common/errors';
import { validateHostConfig } from '../../../../agent/host/config';
import {
  discoverGuests,
  nextGuests,
  rereadOn,
  verdictOf,
} from '../../../../agent/host/libvirt/auto-guests';
import { readGuestMetadata } from '../../../../agent/host/libvirt/guest-metadata';
import { EventLineParser, type DomainEvent } from '../../../../agent/host/libvirt/events';
import { Virsh } from '../../../../agent/host/libvirt/virsh';
import { FakeVirsh, fixture, LACKS, MiB, withMetadata } from './fake-virsh';

const AUTO = validateHostConfig({ hypervisor: 'libvirt', guests: 'auto' });

test('host.yaml: guests: auto needs hypervisor libvirt; with it the guest list starts empty', () => {
  expect(AUTO).toMatchObject({ autoGuests: true, guests: [] });
  let err: unknown;
  try {
    validateHostConfig({ guests: 'auto' });
  } catch (e) {
    err = e;
  }
  expect(isNestError(err, 'CONFIG_INVALID')).toBe(true);
  expect((err as { problems: { field: string; value: unknown }[] }).problems).toEqual([
    expect.objectContaining({ field: 'guests', value: 'auto' }),
  ]);
});

test('the recorded metadata: priority and floor, read by namespace whatever the prefix', async () => {
  const live = await fixture('live-running.xml');
  expect(readGuestMetadata(withMetadata(live))).toEqual({
    found: true,
    entry: { priority: 10, floor: { cpus: 1, memory: '64MiB' } },
    problems: [],
  });
  // Another prefix, the same namespace: the same settings. Another namespace: none.
  const nb = withMetadata(
    live,
    '<nb:priority>7</nb:priority><nb:cpuMode>quota</nb:cpuMode>',
    '<nb:guest xmlns:nb="https://nestbroker.invalid/xmlns/guest/1" name="web1">',
    '</nb:guest>',
  );
  expect(readGuestMetadata(nb)).toMatchObject({
    found: true,
    entry: { name: 'web1', priority: 7, cpuMode: 'quota' },
  });
  const other = withMetadata(
    live,
    '<x:priority>7</x:priority>',
    '<x:guest xmlns:x="https://example.invalid/other">',
    '</x:guest>',
  );
  expect(readGuestMetadata(other)).toEqual({ found: false });
  expect(readGuestMetadata(live)).toEqual({ found: false });
});

test('a domain with the channel and good metadata is a guest with its settings', async () => {
  const xml = withMetadata(
    await fixture('live-running.xml'),
    `<nestbroker:priority>10</nestbroker:priority>
      <nestbroker:floor cpus="1" memory="64MiB"/>
      <nestbroker:cpuMode>quota</nestbroker:cpuMode>
      <nestbroker:memoryMode>balloon</nestbroker:memoryMode>
      <nestbroker:confirmTimeout>5s</nestbroker:confirmTimeout>`,
  );
  const v = verdictOf('nbfix', xml);
  expect(v.kind).toBe('guest');
  if (v.kind !== 'guest') return;
  expect(v.guest).toMatchObject({
    name: 'nbfix',
    priority: 10,
    floor: { cpus: 1, memoryBytes: 64 * MiB },
    allocationFromLibvirt: true,
    libvirt: { domain: 'nbfix', cpuMode: 'quota', memoryMode: 'balloon', confirmTimeoutMs: 5000 },
    channel: { transport: 'libvirt', domain: 'nbfix' },
  });
});

test('bad metadata: every problem at once, each with its field and the value received', async () => {
  const xml = withMetadata(
    await fixture('live-running.xml'),
    `<nestbroker:priority>-3</nestbroker:priority>
      <nestbroker:floor cpus="1" memory="lots" colour="red"/>
      <nestbroker:cpuMode>unplugg</nestbroker:cpuMode>
      <nestbroker:memoryMode>virtio-mem</nestbroker:memoryMode>
      <nestbroker:memoryMode>balloon</nestbroker:memoryMode>
      <nestbroker:channel>/tmp/x</nestbroker:channel>`,
  );
  const v = verdictOf('nbfix', xml);
  expect(v.kind).toBe('invalid');
  if (v.kind !== 'invalid') return;
  const byField = Object.fromEntries(v.problems.map((p) => [p.field, p]));
  expect(Object.keys(byField).sort()).toEqual(
    [
      'metadata.channel',
      'metadata.cpuMode',
      'metadata.floor.colour',
      'metadata.floor.memory',
      'metadata.memoryMode',
      'metadata.priority',
    ].sort(),
  );
  expect(byField['metadata.priority'].value).toBe(-3);
  expect(byField['metadata.floor.memory'].value).toBe('lots');
  expect(byField['metadata.cpuMode'].value).toBe('unplugg');
  expect(byField['metadata.memoryMode'].message).toMatch(/given 2 times/);
  expect(byField['metadata.channel'].message).toMatch(/not a nestbroker guest setting/);
});

test('the channel but no metadata: invalid, naming the missing priority and the missing element', async () => {
  const v = verdictOf('nbfix', await fixture('live-running.xml'));
  expect(v.kind).toBe('invalid');
  if (v.kind !== 'invalid') return;
  expect(v.problems.map((p) => p.field)).toEqual(['metadata.priority', 'metadata']);
});

test('no org.nestbroker.0 channel: not a guest, whatever its metadata says', async () => {
  const xml = LACKS.channel(withMetadata(await fixture('live-running.xml')));
  expect(verdictOf('nbfix', xml)).toEqual({ kind: 'not-ours', why: 'no org.nestbroker.0 channel' });
});

function recordingLog() {
  const lines: Record<string, unknown>[] = [];
  const log = pino(
    { level: 'debug' },
    new Writable({
      write(chunk: Buffer, _enc, cb) {
        lines.push(JSON.parse(chunk.toString()) as Record<string, unknown>);
        cb();
      },
    }),
  );
  return { log, lines };
}

test('discovery at start: the running domain becomes a guest; a bad one is skipped and logged, no crash', async () => {
  const fake = await FakeVirsh.create();
  const virsh = new Virsh({ runner: fake.runner });
  fake.edit = (xml) => withMetadata(xml);
  const good = recordingLog();
  const guests = await discoverGuests(virsh, AUTO, good.log);
  expect(guests).toHaveLength(1);
  // The allocation from the persistent XML, as for a guest in host.yaml without one.
  expect(guests[0]).toMatchObject({
    name: 'nbfix',
    priority: 10,
    allocation: { cpus: 2, memoryBytes: 256 * MiB },
    allocationFromLibvirt: false,
  });

  fake.edit = (xml) => withMetadata(xml, '<nestbroker:priority>high</nestbroker:priority>');
  const bad = recordingLog();
  expect(await discoverGuests(virsh, AUTO, bad.log)).toEqual([]);
  const errors = bad.lines.filter((l) => l.level === 50);
  expect(errors).toEqual([
    expect.objectContaining({ domain: 'nbfix', field: 'metadata.priority', value: 'high' }),
    expect.objectContaining({ domain: 'nbfix', code: 'CONFIG_INVALID', problems: 1 }),
  ]);
  expect(String(errors[0].msg)).toContain('domain "nbfix": metadata.priority');
});

test('events that make a domain be read again, and the guest list after', async () => {
  expect(rereadOn({ type: 'metadata-change', detail: 'type element, uri https://x' })).toBe('read');
  expect(rereadOn({ type: 'lifecycle', detail: 'Started Booted' })).toBe('read');
  expect(rereadOn({ type: 'lifecycle', detail: 'Defined Added' })).toBe('read');
  expect(rereadOn({ type: 'lifecycle', detail: 'Undefined Removed' })).toBe('leave');
  expect(rereadOn({ type: 'lifecycle', detail: 'Stopped Destroyed' })).toBeNull();
  expect(rereadOn({ type: 'tunable', detail: '' })).toBeNull();
  const v = verdictOf('nbfix', withMetadata(await fixture('live-running.xml')));
  if (v.kind !== 'guest') throw new Error('expected a guest');
  expect(nextGuests([], 'nbfix', v).map((g) => g.name)).toEqual(['nbfix']);
  expect(nextGuests([v.guest], 'nbfix', 'leave')).toEqual([]);
  // Down: the guest stays (its books and notices wait for the start); bad metadata: kept.
  expect(nextGuests([v.guest], 'nbfix', { kind: 'not-ours', why: 'not running' })).toEqual([
    v.guest,
  ]);
  expect(nextGuests([v.guest], 'nbfix', { kind: 'invalid', problems: [] })).toEqual([v.guest]);
  // The channel taken out of the domain: no longer a guest.
  expect(
    nextGuests([v.guest], 'nbfix', { kind: 'not-ours', why: 'no org.nestbroker.0 channel' }),
  ).toEqual([]);
  // A second domain whose metadata claims the same guest name: refused, naming the field;
  // the guest list is the caller's to keep (at start the domain is skipped and logged).
  const other = { ...v.guest, libvirt: { ...v.guest.libvirt!, domain: 'nbother' } };
  let refused: unknown;
  try {
    nextGuests([v.guest], 'nbother', { kind: 'guest', guest: other });
  } catch (err) {
    refused = err;
  }
  expect(isNestError(refused, 'CONFIG_INVALID')).toBe(true);
  expect((refused as { problems: unknown[] }).problems).toEqual([
    expect.objectContaining({ field: 'metadata.name', value: 'nbfix' }),
  ]);
});

test('the example domain of docs/libvirt/domain.xml is a guest with its metadata’s settings', async () => {
  const xml = await fs.readFile(
    path.join(__dirname, '../../../../docs/libvirt/domain.xml'),
    'utf8',
  );
  const v = verdictOf('vm1', xml);
  expect(v).toMatchObject({
    kind: 'guest',
    guest: {
      name: 'vm1',
      priority: 10,
      floor: { cpus: 1, memoryBytes: 2 * 1024 * MiB },
      libvirt: { cpuMode: 'unplug', memoryMode: 'virtio-mem' },
    },
  });
});

test('the recorded metadata-change and Started events read the domain again', async () => {
  const events: DomainEvent[] = [];
  const parser = new EventLineParser((e) => events.push(e));
  parser.push(await fixture('events-metadata.txt'));
  parser.flush();
  expect(events.map((e) => [e.type, e.domain, rereadOn(e)])).toEqual([
    ['lifecycle', 'nbfix', 'read'], // Resumed Unpaused
    ['lifecycle', 'nbfix', 'read'], // Started Booted
    ['metadata-change', 'nbfix', 'read'],
    ['lifecycle', 'nbfix', null], // Shutdown
    ['lifecycle', 'nbfix', null], // Stopped: the guest stays for the next start
    ['lifecycle', 'nbfix', 'read'],
    ['lifecycle', 'nbfix', 'read'],
    ['tunable', 'nbfix', null],
  ]);
});
