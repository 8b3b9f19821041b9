/**
 * The watcher's live loop (agent/host/watcher.ts), driven tick by tick with an injected
 * clock: a recording host source reports MemAvailable under the threshold, the real
 * trigger policy waits out `trigger.for`, then the real host broker journals an automatic
 * reclaim from the lowest-priority guest, and the loop does not pile a second one on.
 */
import { EventEmitter } from 'node:events';
import { promises as fs } from 'node:fs';
import os from 'node:os';
import path from 'node:path';
import { silentLogger } from '../../../agent/common/log';
import { validateHostConfig, type HostConfig } from '../../../agent/host/config';
import { HostBroker, type HostChannel } from '../../../agent/host/host-broker';
import type { VmActuator } from '../../../agent/host/actuator';
import { Watcher, type HostSource, type WatcherClock } from '../../../agent/host/watcher';
import { PROTOCOL_VERSION } from '../../../agent/protocol/messages';

const MiB = 1024 * 1024;

/** Timers that fire only when the test says so; `now` moves to each timer's time. */
class StepClock implements WatcherClock {
  t = 1_000_000;
  timers: { at: number; fn: () => void; id: number }[] = [];
  private ids = 0;
  now = (): number => this.t;
  setTimeout = (fn: () => void, ms: number): unknown => {
    const id = ++this.ids;
    this.timers.push({ at: this.t + ms, fn, id });
    return id;
  };
  clearTimeout = (h: unknown): void => {
    this.timers = this.timers.filter((x) => x.id !== h);
  };
  /** Fires the next timer and waits until the loop has scheduled its next one. */
  async fireNext(): Promise<void> {
    this.timers.sort((a, b) => a.at - b.at);
    const next = this.timers.shift();
    if (!next) throw new Error('no timer pending: the loop stopped');
    this.t = next.at;
    next.fn();
    // The step is async (journal writes, fsync): wait, in real time, for its next timer.
    const until = Date.now() + 10_000;
    while (this.timers.length === 0) {
      if (Date.now() > until) throw new Error('the loop did not schedule its next tick');
      await new Promise((r) => setTimeout(r, 2));
    }
  }
}

/** A host source that records when it was asked and answers what the test sets. */
class RecordingSource implements HostSource {
  calls: number[] = [];
  memAvailable = 512 * MiB;
  constructor(private readonly clock: StepClock) {}
  usage = async () => {
    this.calls.push(this.clock.t);
    return { memAvailable: this.memAvailable, memTotal: 8192 * MiB, cpuCount: 2 };
  };
  memoryPsi = async () => undefined;
}

/** The emitter of an agent that connects and says hello for `g` on the next turn. */
const helloingAgent = (g: { name: string }): EventEmitter => {
  const ee = new EventEmitter();
  setImmediate(() => {
    ee.emit('open');
    ee.emit('message', {
      type: 'hello',
      id: `hello-${g.name}`,
      version: PROTOCOL_VERSION,
      guest: g.name,
      inventory: { cpus: 2, memoryBytes: 1024 * MiB, projects: [] },
      lastSeq: 0,
    });
  });
  return ee;
};
/** A guest channel that never connects (the notice waits in the journal). */
const awayChannel = (): HostChannel => {
  const ee = new EventEmitter();
  return {
    send: () => false,
    on: (e: string, fn: (...a: unknown[]) => void) => ee.on(e, fn),
    close: () => undefined,
  };
};
/**
 * A guest whose agent connects and says hello, then never answers (the notice stays
 * pending: the loop must not pile a second one on).
 */
const quietChannel = (g: { name: string }): HostChannel => {
  const ee = helloingAgent(g);
  return {
    send: () => true,
    on: (e: string, fn: (...a: unknown[]) => void) => ee.on(e, fn),
    close: () => ee.emit('close'),
  };
};
const untouchedActuator: VmActuator = {
  apply: () => Promise.reject(new Error('nothing may be actuated before an outcome')),
};

let dir: string;
let broker: HostBroker;

async function waitConnected(names: string[]): Promise<void> {
  const until = Date.now() + 10_000;
  while (!names.every((n) => broker.status(n).connected)) {
    if (Date.now() > until) throw new Error(`guests ${names.join(', ')} did not say hello`);
    await new Promise((r) => setTimeout(r, 2));
  }
}
let watcher: Watcher;
afterEach(async () => {
  watcher?.stop();
  await broker?.stop();
  await fs.rm(dir, { recursive: true, force: true });
});

test('MemAvailable under the threshold for `trigger.for` → one automatic reclaim from the lowest-priority guest, then it waits', async () => {
  dir = await fs.mkdtemp(path.join(os.tmpdir(), 'nb-watcher-'));
  const guest = (name: string, priority: number) => ({
    name,
    priority,
    allocation: { cpus: 2, memory: '1GiB' },
    floor: { cpus: 1, memory: '256MiB' },
    channel: { transport: 'unix', path: path.join(dir, `${name}.sock`) },
  });
  const cfg: Readonly<HostConfig> = validateHostConfig({
    stateDir: path.join(dir, 'state'),
    trigger: {
      enabled: true,
      memoryAvailableBelow: '1GiB',
      for: '30s',
      interval: '5s',
      cooldown: '2m',
      deadline: '60s',
      step: { memory: '256MiB' },
    },
    guests: [guest('vm-high', 100), guest('vm-low', 1)],
  });
  broker = new HostBroker({
    config: cfg,
    actuator: untouchedActuator,
    connect: quietChannel,
    log: silentLogger(),
  });
  await broker.start();
  await waitConnected(['vm-high', 'vm-low']);
  const clock = new StepClock();
  const source = new RecordingSource(clock);
  watcher = new Watcher(cfg, broker, null, silentLogger(), { source, clock });
  const t0 = clock.t;
  watcher.start();

  // 0 s … 25 s: the breach is there but has not lasted `for` (30 s): nothing is issued.
  for (let i = 0; i < 6; i++) {
    await clock.fireNext();
    expect(watcher.last()?.decision).toMatchObject({ fire: false });
    expect(broker.notices()).toEqual([]);
  }
  expect(watcher.last()?.decision).toEqual({
    fire: false,
    why: 'threshold crossed for 25000 ms of the 30000 ms required',
  });

  // 30 s: it fires, on the lowest-priority guest, for one step.
  await clock.fireNext();
  expect(watcher.last()?.decision).toMatchObject({
    fire: true,
    guest: 'vm-low',
    change: { memoryBytes: 256 * MiB, cpus: 0 },
  });
  const [n] = broker.notices();
  expect(n).toMatchObject({
    source: 'trigger',
    state: 'issued',
    notice: { guest: 'vm-low', kind: 'reclaim', change: { memoryBytes: 256 * MiB, cpus: 0 } },
  });
  expect(n.notice.reason).toMatch(/^automatic: host MemAvailable 536870912 B < 1073741824 B/);
  expect(broker.status('vm-low').books.granted.memoryBytes).toBe(768 * MiB);
  expect(broker.status('vm-high').books.granted.memoryBytes).toBe(1024 * MiB);

  // 35 s: still under pressure, but that notice has no outcome yet: no second one.
  await clock.fireNext();
  expect(watcher.last()?.decision).toMatchObject({ fire: false });
  expect(broker.notices()).toHaveLength(1);

  // The source was asked once a tick, every `trigger.interval` after the previous step.
  expect(source.calls.map((c) => c - t0)).toEqual([
    0, 5000, 10000, 15000, 20000, 25000, 30000, 35000,
  ]);
  watcher.stop();
  expect(clock.timers).toEqual([]);
});

test('pressure that clears before `for` has passed issues nothing, and the breach clock restarts', async () => {
  dir = await fs.mkdtemp(path.join(os.tmpdir(), 'nb-watcher-'));
  const cfg = validateHostConfig({
    stateDir: path.join(dir, 'state'),
    trigger: {
      enabled: true,
      memoryAvailableBelow: '1GiB',
      for: '10s',
      interval: '5s',
      step: { memory: '128MiB' },
    },
    guests: [
      {
        name: 'vm1',
        priority: 1,
        allocation: { cpus: 2, memory: '1GiB' },
        channel: { transport: 'unix', path: path.join(dir, 'vm1.sock') },
      },
    ],
  });
  broker = new HostBroker({
    config: cfg,
    actuator: untouchedActuator,
    connect: awayChannel,
    log: silentLogger(),
  });
  await broker.start();
  const clock = new StepClock();
  const source = new RecordingSource(clock);
  watcher = new Watcher(cfg, broker, null, silentLogger(), { source, clock });
  watcher.start();
  await clock.fireNext(); // 0 s: breach starts
  await clock.fireNext(); // 5 s
  source.memAvailable = 4096 * MiB;
  await clock.fireNext(); // 10 s: cleared
  expect(watcher.triggerState().breachSince).toBeNull();
  source.memAvailable = 512 * MiB;
  await clock.fireNext(); // 15 s: a new breach starts here
  await clock.fireNext(); // 20 s
  expect(watcher.last()?.decision).toEqual({
    fire: false,
    why: 'threshold crossed for 5000 ms of the 10000 ms required',
  });
  expect(broker.notices()).toEqual([]);
});

test('a guest whose agent is not connected is passed over, counted, and no cooldown starts', async () => {
  dir = await fs.mkdtemp(path.join(os.tmpdir(), 'nb-watcher-'));
  const cfg = validateHostConfig({
    stateDir: path.join(dir, 'state'),
    trigger: {
      enabled: true,
      memoryAvailableBelow: '1GiB',
      for: '5s',
      interval: '5s',
      cooldown: '2m',
      step: { memory: '128MiB' },
    },
    guests: [
      {
        name: 'vm-away',
        priority: 1,
        allocation: { cpus: 2, memory: '1GiB' },
        channel: { transport: 'unix', path: path.join(dir, 'vm-away.sock') },
      },
    ],
  });
  broker = new HostBroker({
    config: cfg,
    actuator: untouchedActuator,
    connect: awayChannel,
    log: silentLogger(),
  });
  await broker.start();
  const clock = new StepClock();
  const source = new RecordingSource(clock);
  watcher = new Watcher(cfg, broker, null, silentLogger(), { source, clock });
  watcher.start();
  // 0 s: the breach starts; 5 s, 10 s, 15 s: it has lasted `for`, but the only guest is away.
  for (let i = 0; i < 4; i++) await clock.fireNext();
  expect(watcher.last()?.decision).toMatchObject({
    fire: false,
    skippedUnreachable: ['vm-away'],
  });
  expect(watcher.skippedUnreachable).toBe(3);
  expect(broker.notices()).toEqual([]);
  expect(broker.status('vm-away').books.granted.memoryBytes).toBe(1024 * MiB);
  expect(watcher.triggerState().lastFiredAt).toBeNull();
});

/**
 * A guest whose agent says hello and carries out every notice at once: ack, then an
 * outcome `complete` freeing (or taking) exactly the change.
 */
const willingChannel = (g: { name: string }): HostChannel => {
  const ee = helloingAgent(g);
  let n = 0;
  return {
    send: (m: { type: string; id: string; notice?: { id: string; change: unknown } }) => {
      if ((m.type === 'notice' || m.type === 'restore') && m.notice) {
        const notice = m.notice;
        setImmediate(() => {
          ee.emit('message', {
            type: 'ack',
            id: `ack-${++n}`,
            replyTo: m.id,
            noticeId: notice.id,
            state: 'accepted',
          });
          const now = new Date().toISOString();
          ee.emit('message', {
            type: 'outcome',
            id: `outcome-${n}`,
            outcome: {
              noticeId: notice.id,
              guest: g.name,
              status: 'complete',
              projects: [],
              freed: notice.change,
              startedAt: now,
              finishedAt: now,
              ms: 1,
            },
          });
        });
      }
      return true;
    },
    on: (e: string, fn: (...a: unknown[]) => void) => ee.on(e, fn),
    close: () => ee.emit('close'),
  } as HostChannel;
};

/** An actuator that records each VM change and reports it done. */
class RecordingActuator implements VmActuator {
  applied: { guest: string; memoryBytes: number; direction: string }[] = [];
  apply: VmActuator['apply'] = async (guest, target, direction) => {
    this.applied.push({ guest: guest.name, memoryBytes: target.memoryBytes, direction });
    const now = new Date().toISOString();
    return { direction, target, startedAt: now, finishedAt: now, errors: [] };
  };
}

test('give-back: once MemAvailable has stayed above the second threshold for `after`, what the trigger took comes back, one step at a time', async () => {
  dir = await fs.mkdtemp(path.join(os.tmpdir(), 'nb-watcher-'));
  const cfg = validateHostConfig({
    stateDir: path.join(dir, 'state'),
    trigger: {
      enabled: true,
      memoryAvailableBelow: '1GiB',
      for: '5s',
      interval: '5s',
      cooldown: '10s',
      step: { memory: '128MiB' },
      giveBack: { memoryAvailableAbove: '2GiB', after: '20s' },
    },
    guests: [
      {
        name: 'vm1',
        priority: 1,
        allocation: { cpus: 2, memory: '1GiB' },
        floor: { cpus: 1, memory: '256MiB' },
        channel: { transport: 'unix', path: path.join(dir, 'vm1.sock') },
      },
    ],
  });
  const actuator = new RecordingActuator();
  broker = new HostBroker({ config: cfg, actuator, connect: willingChannel, log: silentLogger() });
  await broker.start();
  await waitConnected(['vm1']);
  const clock = new StepClock();
  const source = new RecordingSource(clock);
  watcher = new Watcher(cfg, broker, null, silentLogger(), { source, clock });
  const granted = (): number => broker.status('vm1').books.granted.memoryBytes;
  const settle = (): Promise<void> =>
    (async () => {
      const until = Date.now() + 10_000;
      while (
        broker.notices().some((x) => !['done', 'late', 'refused', 'cancelled'].includes(x.state))
      ) {
        if (Date.now() > until) throw new Error('a notice did not finish');
        await new Promise((r) => setTimeout(r, 2));
      }
    })();
  watcher.start();

  // Pressure (512 MiB available < 1 GiB): 0 s breach, 5 s fire; 10 s (cooldown), 15 s fire.
  await clock.fireNext();
  await clock.fireNext();
  await settle();
  expect(granted()).toBe(896 * MiB);
  await clock.fireNext();
  await clock.fireNext();
  await settle();
  expect(granted()).toBe(768 * MiB);

  // 1.5 GiB available: no breach any more, but inside the band (below 2 GiB): nothing back.
  source.memAvailable = 1536 * MiB;
  for (let i = 0; i < 6; i++) await clock.fireNext();
  expect(watcher.last()?.giveBack).toEqual({ give: false, why: 'pressure not cleared' });
  expect(granted()).toBe(768 * MiB);

  // 3 GiB available: cleared; 20 s later one step back (a restore from the trigger).
  source.memAvailable = 3072 * MiB;
  await clock.fireNext(); // cleared since now
  for (let i = 0; i < 3; i++) {
    await clock.fireNext();
    expect(watcher.last()?.giveBack).toMatchObject({ give: false });
  }
  await clock.fireNext(); // 20 s of clear
  expect(watcher.last()?.giveBack).toMatchObject({
    give: true,
    guest: 'vm1',
    change: { memoryBytes: 128 * MiB, cpus: 0 },
  });
  await settle();
  expect(granted()).toBe(896 * MiB);
  const restores = broker.notices().filter((x) => x.notice.kind === 'restore');
  expect(restores.map((x) => [x.source, x.state, x.notice.change.memoryBytes])).toEqual([
    ['trigger', 'done', 128 * MiB],
  ]);
  expect(restores[0].notice.reason).toMatch(
    /^automatic give-back: host MemAvailable \d+ B ≥ \d+ B for 20000 ms$/,
  );

  // Another 20 s: the second step, and then nothing is left of what the trigger took.
  for (let i = 0; i < 4; i++) await clock.fireNext();
  await clock.fireNext();
  await settle();
  expect(granted()).toBe(1024 * MiB);
  for (let i = 0; i < 5; i++) await clock.fireNext();
  expect(watcher.last()?.giveBack).toEqual({
    give: false,
    why: 'nothing the trigger took is left to give back',
  });
  // The VM went down twice and up twice (the broker raises it before telling the guest).
  expect(actuator.applied.map((a) => [a.direction, a.memoryBytes / MiB])).toEqual([
    ['down', 896],
    ['down', 768],
    ['up', 896],
    ['up', 1024],
  ]);
  expect(watcher.triggerView().giveBack).toMatchObject({
    afterMs: 20_000,
    last: { guest: 'vm1', change: { memoryBytes: 128 * MiB, cpus: 0 } },
  });
});
