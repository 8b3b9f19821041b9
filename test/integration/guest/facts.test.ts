/**
 * The guest agent's `facts` message (docs/protocol.md, "facts (guest → host)"), from the
 * real daemon: its online CPUs and MemTotal are read from fake files under
 * NESTBROKER_SYSROOT, the test plays the host over the agent's unix channel. After a
 * welcome that lists `cpu-unplug`, nothing is sent while the files stay the same; a CPU
 * going offline (as after a vCPU unplug, which comes after the outcome) reaches the host
 * as one `facts` message with the new list, and so does a new MemTotal. A host whose
 * welcome did not list the capability hears nothing of it.
 */
import { existsSync, mkdirSync, writeFileSync } from 'node:fs';
import * as path from 'node:path';
import type { FactsMsg, Hello, Message } from '../../../agent/protocol/messages';
import { connectUnix } from '../../../agent/transport/unix';
import type { SocketChannel } from '../../../agent/transport/channel';
import { GuestUnderTest, waitFor, type Env } from './harness';

jest.setTimeout(90_000);

const KiB = 1024;
let g: GuestUnderTest;
let env: Env;
const upstreamOf = (e: Env): string => path.join(e.dir, 'upstream.sock');
const sysroot = (e: Env): string => path.join(e.dir, 'sysroot');
const onlineFile = (e: Env): string => path.join(sysroot(e), 'sys/devices/system/cpu/online');
const meminfoFile = (e: Env): string => path.join(sysroot(e), 'proc/meminfo');
const meminfo = (kB: number): string =>
  `MemTotal:       ${kB} kB\nMemFree:          100000 kB\nMemAvailable:     200000 kB\n`;

interface Host {
  ch: SocketChannel;
  inbox: Message[];
}

async function host(): Promise<Host> {
  await waitFor('the upstream socket', () => existsSync(upstreamOf(env)));
  const ch = await connectUnix(upstreamOf(env));
  const h: Host = { ch, inbox: [] };
  ch.on('message', (m: Message) => h.inbox.push(m));
  return h;
}

/** Says hello back with these capabilities; the guest's hello. */
async function welcome(h: Host, capabilities: string[]): Promise<Hello> {
  await waitFor('hello', () => h.inbox.some((m) => m.type === 'hello'));
  const hello = h.inbox.find((m) => m.type === 'hello') as Hello;
  h.ch.send({
    type: 'welcome',
    id: `w-${capabilities.length}`,
    replyTo: hello.id,
    version: 1,
    guest: 'vm-test',
    heartbeatMs: 0,
    capabilities,
  });
  return hello;
}

const factsOf = (h: Host): FactsMsg[] => h.inbox.filter((m): m is FactsMsg => m.type === 'facts');

/** The agent's debug lines with this message so far (its log is JSON lines on stdout). */
const logged = (msg: string): number =>
  g
    .agent!.stdout()
    .split('\n')
    .filter((l) => l.includes(`"msg":"${msg}"`)).length;
/** agent/client/client.ts logs each facts check that found the files as last sent. */
const UNCHANGED = 'online CPUs / MemTotal checked: unchanged';
const SENT = 'sent the changed online CPUs / MemTotal';
/** agent/guest/supervisor.ts logs each round of supervision (every usageInterval, 500 ms here). */
const SUPERVISION = 'supervision: every project looked at';

let pings = 0;
/** A ping and its pong: whatever the agent sent before it read the ping is in the inbox now. */
async function roundTrip(h: Host): Promise<void> {
  const id = `p-${++pings}`;
  h.ch.send({ type: 'ping', id, t: 0 });
  await waitFor(`the pong to ${id}`, () =>
    h.inbox.some((m) => m.type === 'pong' && m.replyTo === id),
  );
}

/**
 * Until the agent has logged `n` more facts checks that found nothing new, then a round
 * trip: those checks ran and sent nothing (a check that sends logs SENT instead, so an
 * agent that sent on every check never gets here). Bounded, not timed.
 */
async function checksLater(h: Host, n = 2): Promise<void> {
  const from = logged(UNCHANGED);
  await waitFor(`${n} more facts checks`, () => logged(UNCHANGED) >= from + n, 30_000);
  await roundTrip(h);
}

beforeAll(async () => {
  g = await GuestUnderTest.start(
    'guest-facts',
    [
      {
        name: 'web',
        priority: 100,
        mode: 'graceful' as const,
        memory: { min: '64MiB', max: '256MiB' },
        cpu: { min: 0.1, max: 1 },
      },
    ],
    {
      extra: (e) => ({ upstream: { transport: 'unix', path: upstreamOf(e) } }),
      prepare: (e) => {
        mkdirSync(path.dirname(onlineFile(e)), { recursive: true });
        mkdirSync(path.dirname(meminfoFile(e)), { recursive: true });
        writeFileSync(onlineFile(e), '0-3\n');
        writeFileSync(meminfoFile(e), meminfo(2097152));
      },
      agentEnv: (e) => ({ NESTBROKER_SYSROOT: sysroot(e) }),
    },
  );
  ({ env } = g);
});

afterAll(() => g?.dispose());

test('to a cpu-unplug host: nothing while unchanged, one facts message per change with what the kernel files say now', async () => {
  const h = await host();
  try {
    const hello = await welcome(h, ['cpu-unplug']);
    // The hello's facts are the fake files'.
    expect(hello.onlineCpus).toEqual([0, 1, 2, 3]);
    expect(hello.memTotal).toBe(2097152 * KiB);

    // Unchanged since the hello: the checks after the welcome send nothing.
    await checksLater(h);
    expect(factsOf(h)).toEqual([]);

    // CPU 3 goes offline (the unplug after the outcome): one message, with the new list.
    writeFileSync(onlineFile(env), '0-2\n');
    await waitFor('a facts message', () => factsOf(h).length > 0);
    await checksLater(h);
    expect(factsOf(h)).toEqual([
      { type: 'facts', id: expect.any(String), onlineCpus: [0, 1, 2], memTotal: 2097152 * KiB },
    ]);

    // A virtio-mem unplug lowers MemTotal: one more, and nothing after it.
    writeFileSync(meminfoFile(env), meminfo(1572864));
    await waitFor('a second facts message', () => factsOf(h).length > 1);
    await checksLater(h);
    expect(factsOf(h).slice(1)).toEqual([
      { type: 'facts', id: expect.any(String), onlineCpus: [0, 1, 2], memTotal: 1572864 * KiB },
    ]);
  } finally {
    await h.ch.close();
  }
});

test('to a host whose welcome lists no cpu-unplug: no facts message, even when the CPUs change', async () => {
  writeFileSync(onlineFile(env), '0-3\n');
  await g.restart();
  const h = await host();
  try {
    const hello = await welcome(h, []);
    expect(hello.onlineCpus).toEqual([0, 1, 2, 3]);
    writeFileSync(onlineFile(env), '0-1\n');
    // Four rounds of supervision later (1.5 s or more of the agent's own time, longer than
    // the 1 s between facts checks) the agent has run no facts check at all on this
    // connection, and sent nothing; it is still there and answering: a ping gets its pong.
    const from = logged(SUPERVISION);
    await waitFor('four rounds of supervision', () => logged(SUPERVISION) >= from + 4, 30_000);
    await roundTrip(h);
    expect(factsOf(h)).toEqual([]);
    expect({ unchanged: logged(UNCHANGED), sent: logged(SENT) }).toEqual({ unchanged: 0, sent: 0 });
  } finally {
    await h.ch.close();
  }
});
