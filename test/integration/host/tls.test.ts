/**
 * Host broker and a guest agent as real processes over TCP with mutual TLS
 * (docs/host-broker.md): a reclaim cascades and its outcome comes back; a plaintext client
 * and a client whose certificate comes from another CA are refused by the guest, which
 * keeps serving the real host all along.
 */
import { promises as fs, readFileSync } from 'node:fs';
import net from 'node:net';
import os from 'node:os';
import path from 'node:path';
import { rpcCall } from '../../../agent/common/rpc';
import type { NoticeView } from '../../../agent/host/api';
import { newMessageId, PROTOCOL_VERSION } from '../../../agent/protocol/messages';
import { connectTls } from '../../../agent/transport/tls';
import { Stack } from '../../../demo/stack';
import { makeTestCerts, type TestCerts } from '../../helpers/tls-certs';

const MiB = 1024 * 1024;
const root = `nestbroker-test-${process.pid}-tls`;
let dir: string;
let certs: TestCerts;
let stack: Stack;

beforeAll(async () => {
  dir = await fs.mkdtemp(path.join(os.tmpdir(), 'nb-host-tls-'));
  certs = makeTestCerts();
  stack = new Stack({
    root,
    dir,
    transport: 'tls',
    tls: {
      ca: certs.caFile,
      serverCert: certs.server.certFile,
      serverKey: certs.server.keyFile,
      clientCert: certs.client.certFile,
      clientKey: certs.client.keyFile,
    },
    guests: [
      {
        name: 'vm1',
        priority: 10,
        memory: '1GiB',
        cpus: 2,
        floor: { memory: '256MiB', cpus: 0.5 },
        projects: [
          {
            name: 'web',
            priority: 100,
            memoryMin: '64MiB',
            memoryMax: '256MiB',
            cpuMin: 0.1,
            cpuMax: 0.5,
            holdMiB: 8,
            burn: 0.01,
          },
          {
            name: 'batch',
            priority: 10,
            memoryMin: '128MiB',
            memoryMax: '512MiB',
            cpuMin: 0.2,
            cpuMax: 1,
            holdMiB: 8,
            burn: 0.01,
          },
        ],
      },
    ],
  });
  await stack.createVms();
  await stack.writeConfigs();
  await stack.startGuest('vm1');
  await stack.startHost();
  await stack.waitConnected();
}, 60_000);

afterAll(async () => {
  await stack?.teardown();
  certs?.cleanup();
  await fs.rm(dir, { recursive: true, force: true });
}, 30_000);

const port = (): number => stack.guests[0].port!;
const connected = async (): Promise<boolean> => {
  const gs = (await rpcCall(stack.hostSocket, 'guests')) as { connected: boolean }[];
  return gs[0].connected;
};

test('over mutual TLS a reclaim cascades to the projects and its outcome comes back; the VM is lowered after it', async () => {
  const n = (await rpcCall(
    stack.hostSocket,
    'reclaim',
    { guest: 'vm1', memory: '512MiB', cpus: 1, deadline: '20s' },
    { timeoutMs: 60_000 },
  )) as NoticeView;
  expect(n).toMatchObject({ state: 'done', outcome: { status: 'complete', guest: 'vm1' } });
  // The guest's plan, carried out: every project's limit in the kernel is what it reported.
  expect(n.outcome!.projects.map((p) => p.name).sort()).toEqual(['batch', 'web']);
  for (const p of n.outcome!.projects)
    if (p.action === 'shrunk')
      expect(
        readFileSync(
          path.join(
            '/sys/fs/cgroup/memory',
            root,
            'vm1',
            'projects',
            p.name,
            'memory.limit_in_bytes',
          ),
          'utf8',
        ).trim(),
      ).toBe(String(p.after.memoryMax));
  expect(n.outcome!.projects.some((p) => p.action !== 'unchanged')).toBe(true);
  expect(Date.parse(n.actuatedAt!)).toBeGreaterThanOrEqual(Date.parse(n.outcomeAt!));
  const limit = readFileSync(
    path.join('/sys/fs/cgroup/memory', root, 'vm1', 'memory.limit_in_bytes'),
    'utf8',
  ).trim();
  expect(limit).toBe(String(512 * MiB));
}, 60_000);

test('a plaintext client is refused: not one protocol byte comes back, and the guest keeps its host', async () => {
  const got = await new Promise<Buffer>((resolve) => {
    const chunks: Buffer[] = [];
    const s = net.connect(port(), '127.0.0.1', () => {
      // What an intruder without TLS would say: a hello pretending to be the host's peer.
      s.write(
        JSON.stringify({
          type: 'hello',
          id: newMessageId(),
          version: PROTOCOL_VERSION,
          guest: 'vm1',
          inventory: { cpus: 1, memoryBytes: 1, projects: [] },
          lastSeq: 0,
        }) + '\n',
      );
    });
    s.on('data', (d: Buffer) => chunks.push(d));
    s.on('error', () => undefined);
    s.on('close', () => resolve(Buffer.concat(chunks)));
    setTimeout(() => s.destroy(), 5000).unref();
  });
  // At most a TLS alert record (content type 21), never the channel's 0xFF or a JSON line.
  expect(got.includes(0xff)).toBe(false);
  expect(got.toString('latin1')).not.toContain('{');
  if (got.length > 0) expect(got[0]).toBe(21);
  expect(await connected()).toBe(true);
}, 20_000);

test('a client with a certificate from another CA is refused (UNAUTHORIZED), and the guest keeps serving the real host', async () => {
  await expect(
    connectTls({
      host: '127.0.0.1',
      port: port(),
      cert: certs.otherCaClient.cert,
      key: certs.otherCaClient.key,
      ca: certs.ca,
      servername: 'localhost',
      timeoutMs: 5000,
    }),
  ).rejects.toMatchObject({ code: 'UNAUTHORIZED' });
  expect(await connected()).toBe(true);
  // The real host still works through that guest: a restore over the same channel.
  const r = (await rpcCall(
    stack.hostSocket,
    'restore',
    { guest: 'vm1', deadline: '20s' },
    { timeoutMs: 60_000 },
  )) as NoticeView;
  expect(r).toMatchObject({ state: 'done', outcome: { status: 'complete' } });
  expect(
    readFileSync(
      path.join('/sys/fs/cgroup/memory', root, 'vm1', 'memory.limit_in_bytes'),
      'utf8',
    ).trim(),
  ).toBe(String(1024 * MiB));
}, 60_000);
