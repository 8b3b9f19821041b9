/**
 * The host↔guest channel cut and restored in the middle of a notice (docs/reliability.md).
 * The host broker reaches the guest agent through a unix-socket relay that the test owns;
 * both daemons are real processes. Mid-notice (a project in its grace period) the relay
 * drops both connections and refuses new ones until the host has failed to dial it (its
 * "guest not reachable: retrying" line), so the guest finishes the notice with nobody to
 * tell; then the relay listens again, the host reconnects, the guest says
 * hello and sends the outcome it owes (the host also re-sends the unanswered notice, which
 * the guest answers from its journal). The notice completes once, with the true outcome.
 */
import { promises as fs } from 'node:fs';
import net from 'node:net';
import path from 'node:path';
import YAML from 'yaml';
import { FaultStack, MiB, waitFor } from './stack';

jest.setTimeout(60_000);

/** A relay from `listenPath` to `target` that can be cut (connections dropped, no listener). */
class Relay {
  private server: net.Server | null = null;
  private readonly socks = new Set<net.Socket>();
  connections = 0;
  constructor(
    readonly listenPath: string,
    readonly target: string,
  ) {}
  async listen(): Promise<void> {
    await fs.rm(this.listenPath, { force: true });
    this.server = net.createServer((a) => {
      this.connections++;
      const b = net.connect(this.target);
      for (const x of [a, b]) {
        this.socks.add(x);
        x.on('error', () => undefined);
        x.on('close', () => {
          this.socks.delete(x);
          a.destroy();
          b.destroy();
        });
      }
      a.pipe(b);
      b.pipe(a);
    });
    await new Promise<void>((r) => this.server!.listen(this.listenPath, r));
  }
  async cut(): Promise<void> {
    for (const x of this.socks) x.destroy();
    const srv = this.server;
    this.server = null;
    if (srv) await new Promise<void>((r) => srv.close(() => r()));
    await fs.rm(this.listenPath, { force: true });
  }
}

let s: FaultStack;
let relay: Relay;

beforeAll(async () => {
  s = await FaultStack.create('cut', [
    {
      name: 'vm1',
      projects: [
        { name: 'web', priority: 100, mode: 'graceful' },
        { name: 'batch', priority: 10, mode: 'stubborn', grace: '2s' },
      ],
    },
  ]);
  // The host dials the relay instead of the guest's channel socket.
  relay = new Relay(path.join(s.dir, 'relay.sock'), s.run('vm1').channel);
  const host = YAML.parse(await fs.readFile(s.stack.hostConfig, 'utf8')) as {
    guests: { channel: { path: string } }[];
  };
  host.guests[0].channel.path = relay.listenPath;
  await fs.writeFile(s.stack.hostConfig, YAML.stringify(host));
  await relay.listen();
  await s.startAll();
});

afterAll(async () => {
  await relay?.cut();
  await s?.teardown();
});

/** The host's "guest not reachable: retrying" lines so far (agent/transport/reconnect.ts). */
async function hostRetries(): Promise<number> {
  const text = await fs.readFile(path.join(s.dir, 'logs', 'host.log'), 'utf8').catch(() => '');
  return text.split('\n').filter((l) => l.includes('"msg":"guest not reachable: retrying"')).length;
}

test('the channel cut mid-notice and restored: the notice completes once, the outcome reaches the host', async () => {
  const before = relay.connections;
  const reclaim = s.reclaim('vm1', '768MiB', 1, '30s');
  // batch has had its SIGTERM and ignores it: the notice is in its 2 s grace period.
  await waitFor('batch in its grace period', async () =>
    s.count('vm1', 'batch', 'ignored') === 1 ? true : undefined,
  );
  const retriesBefore = await hostRetries();
  await relay.cut();
  // The guest finishes alone: its journal says done while nobody listens.
  const g = await waitFor(
    'the guest to finish with the channel down',
    async () => (await s.guestNotices('vm1')).find((r) => r.state === 'done'),
    10_000,
  );
  const hostView = (await s.hostNotices('vm1')).find((r) => r.id === g.id)!;
  expect(hostView.outcome).toBeUndefined(); // the host has not heard it yet
  expect(s.vmMemory('vm1')).toBe(1024 * MiB);
  // The host tried while nobody listened, and will try again: then the relay listens.
  await waitFor('the host to fail a dial', async () =>
    (await hostRetries()) > retriesBefore ? true : undefined,
  );
  await relay.listen();

  const n = await reclaim;
  expect(relay.connections).toBeGreaterThan(before); // it really reconnected
  expect(n).toMatchObject({ id: g.id, state: 'done', outcome: { status: 'complete' } });
  expect(n.outcome!.projects.map((p) => [p.name, p.action, p.exit])).toEqual([
    ['batch', 'stopped', 'killed'],
    ['web', 'shrunk', null],
  ]);
  expect(n.outcome).toEqual(g.outcome); // the guest's own outcome, as journaled
  expect(s.vmMemory('vm1')).toBe(256 * MiB);
  // Once: one SIGTERM, one start, one record on each side.
  expect(s.count('vm1', 'batch', 'ignored')).toBe(1);
  expect(s.count('vm1', 'batch', 'start')).toBe(1);
  expect(s.procs('vm1', 'batch')).toEqual([]);
  const gs = (await s.guestNotices('vm1')).filter((r) => r.id === g.id);
  expect(gs).toHaveLength(1);
  expect(gs[0].runs).toBe(1);
  expect((await s.hostNotices('vm1')).filter((r) => r.id === g.id)).toHaveLength(1);
});
