/**
 * The automatic trigger as an operator sees it, against a real host condition (the host's
 * own MemAvailable, read by the real watcher) with the host broker and a guest agent as
 * processes: the threshold is set above what this machine has in all (MemTotal + 1 GiB), so
 * the host is in breach from the first look. vm1 (the lowest priority) never starts: the
 * trigger passes it over and reclaims one step from vm2. Then:
 *
 *   - `nestctl status` (human) shows the thresholds, the breach and since when, the last
 *     fire, the current decision and the guest passed over;
 *   - `nestctl notices` (human) shows each notice's source (trigger / operator) and reason;
 *   - `/metrics` counts vm1 in nestbroker_host_trigger_skipped_unreachable_total.
 */
import { spawn } from 'node:child_process';
import { promises as fs, readFileSync } from 'node:fs';
import * as http from 'node:http';
import * as net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { rpcCall } from '../../../agent/common/rpc';
import type { NoticeView } from '../../../agent/host/api';
import { NESTCTL, Stack, waitFor } from '../../../demo/stack';
import { webGuests } from './web-guests';

jest.setTimeout(90_000);

const MiB = 1024 * 1024;
const root = `nestbroker-test-${process.pid}-trigstat`;
const memTotal =
  Number(/^MemTotal:\s+(\d+) kB/m.exec(readFileSync('/proc/meminfo', 'utf8'))![1]) * 1024;
const threshold = memTotal + 1024 * MiB;
const guests = webGuests(['vm1', 'vm2']);

let dir: string;
let stack: Stack;
let metricsPort: number;

function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.listen(0, '127.0.0.1', () => {
      const port = (s.address() as net.AddressInfo).port;
      s.close(() => resolve(port));
    });
    s.on('error', reject);
  });
}

function nestctl(...args: string[]): Promise<{ code: number | null; out: string; err: string }> {
  return new Promise((resolve) => {
    const p = spawn(process.execPath, [NESTCTL, '--socket', stack.hostSocket, ...args]);
    let out = '';
    let err = '';
    p.stdout.on('data', (d: Buffer) => (out += d.toString()));
    p.stderr.on('data', (d: Buffer) => (err += d.toString()));
    p.on('close', (code) => resolve({ code, out, err }));
  });
}

const notices = async (): Promise<NoticeView[]> =>
  (await rpcCall(stack.hostSocket, 'notices', {})) as NoticeView[];

beforeAll(async () => {
  dir = await fs.mkdtemp(path.join(os.tmpdir(), 'nb-trigstat-'));
  metricsPort = await freePort();
  stack = new Stack({
    root,
    dir,
    guests,
    transport: 'unix',
    hostMetricsPort: metricsPort,
    hostExtra: {
      trigger: {
        enabled: true,
        memoryAvailableBelow: threshold,
        for: '1s',
        interval: '500ms',
        cooldown: '1h',
        deadline: '20s',
        step: { memory: '128MiB' },
      },
    },
  });
  await stack.createVms();
  await stack.writeConfigs();
  await stack.startGuest('vm2');
  await stack.startHost();
  await stack.waitConnected(['vm2']);
  await waitFor(
    'the trigger to reclaim from vm2',
    async () => (await notices()).some((n) => n.source === 'trigger' && n.state === 'done'),
    60_000,
  );
}, 90_000);

afterAll(async () => {
  await stack?.teardown();
  await fs.rm(dir, { recursive: true, force: true });
}, 30_000);

test('the trigger passed over vm1 (not connected) and took one step from vm2', async () => {
  const ns = await notices();
  expect(ns.map((n) => [n.guest, n.source, n.state, n.change.memoryBytes])).toEqual([
    ['vm2', 'trigger', 'done', 128 * MiB],
  ]);
  expect(ns[0].reason).toMatch(/^automatic: host MemAvailable \d+ B < \d+ B for \d+ ms$/);
});

test('nestctl status shows thresholds, breach, last fire, decision and who was passed over', async () => {
  // One look after the fire, so the decision shown is what the trigger does now.
  await waitFor('the watcher to look again after the fire', async () => {
    const j = JSON.parse((await nestctl('status', '--json')).out) as {
      trigger: { decision: { fire: boolean } };
    };
    return !j.trigger.decision.fire;
  });
  const r = await nestctl('status');
  expect(r.code).toBe(0);
  const lines = r.out.split('\n');
  const line = (prefix: string): string => lines.find((l) => l.trimStart().startsWith(prefix))!;
  expect(line('trigger:')).toMatch(
    /^trigger: on; fires when host MemAvailable < \S+ for 1s; step 128MiB, 0 CPUs, deadline 20s, cooldown 1h, looks every 500ms$/,
  );
  // Still in breach (nothing can free more than the machine has): since when, and how long.
  expect(line('breach:')).toMatch(
    /^ {2}breach: +since \d{4}-\d\d-\d\d \d\d:\d\d:\d\dZ \(for \S+; \S+ of the 1s a step needs counted since the last fire\)$/,
  );
  expect(line('last fire:')).toMatch(
    /^ {2}last fire: +\d{4}-\S+ \d\d:\d\d:\d\dZ \(\S+ ago\): 128MiB, 0 CPUs from vm2; automatic: host MemAvailable \d+ B < \d+ B for \d+ ms; cooling down for \S+ more$/,
  );
  // After a fire the breach clock starts again (each step needs a full `for`), then the
  // cooldown holds it: the decision is one of the two.
  expect(line('decision:')).toMatch(
    /^ {2}decision: +(cooling down after the last reclaim|threshold crossed for \d+ ms of the 1000 ms required) \(at .*\)$/,
  );
  expect(line('passed over')).toMatch(/^ {2}passed over \(not connected\): vm1 \d+×$/);
  // The same in --json, with the numbers.
  const j = JSON.parse((await nestctl('status', '--json')).out) as {
    trigger: {
      thresholds: { memoryAvailableBelowBytes: number; forMs: number };
      breachForMs: number;
      lastFire: { guest: string };
      skippedUnreachable: Record<string, number>;
    };
  };
  expect(j.trigger.thresholds).toMatchObject({ memoryAvailableBelowBytes: threshold, forMs: 1000 });
  expect(j.trigger.breachForMs).toBeGreaterThanOrEqual(0);
  expect(j.trigger.lastFire.guest).toBe('vm2');
  expect(j.trigger.skippedUnreachable.vm1).toBeGreaterThanOrEqual(1);
});

test('nestctl notices shows where each notice came from and why', async () => {
  const op = await nestctl('reclaim', 'vm2', '--memory', '64MiB', '--reason', 'disk maintenance');
  expect(op.code).toBe(0);
  const r = await nestctl('notices');
  expect(r.code).toBe(0);
  const [header, ...rows] = r.out.trim().split('\n');
  expect(header).toMatch(/^ID\s+KIND\s+FROM\s+STATE\s+.*\sREASON$/);
  // Newest first: the operator's, then the trigger's.
  expect(rows[0]).toMatch(/\sreclaim\s+operator\s+done\s.*\sdisk maintenance$/);
  expect(rows[1]).toMatch(
    /\sreclaim\s+trigger\s+done\s.*\sautomatic: host MemAvailable \d+ B < \d+ B for \d+ ms$/,
  );
});

test('/metrics counts the guest passed over', async () => {
  const text = await new Promise<string>((resolve, reject) => {
    http
      .get({ host: '127.0.0.1', port: metricsPort, path: '/metrics' }, (res) => {
        let body = '';
        res.on('data', (d: Buffer) => (body += d.toString()));
        res.on('end', () => resolve(body));
      })
      .on('error', reject);
  });
  const m = /^nestbroker_host_trigger_skipped_unreachable_total\{guest="vm1"\} (\d+)$/m.exec(text);
  expect(Number(m?.[1])).toBeGreaterThanOrEqual(1);
  expect(text).toMatch(/^nestbroker_host_trigger_skipped_unreachable_total\{guest="vm2"\} 0$/m);
});
