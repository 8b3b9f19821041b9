/**
 * Prometheus metrics (docs/architecture.md, "Observability") from the real daemons: a host
 * broker and a guest agent as processes, one reclaim that stops the low-priority project
 * and shrinks the other, then what each daemon's /metrics says, checked against what really
 * happened (the project's marker, the kernel's limit files, the host's books).
 */
import http from 'node:http';
import net from 'node:net';
import { silentLogger } from '../../../agent/common/log';
import { MetricsServer } from '../../../agent/common/metrics';
import { Registry } from 'prom-client';
import { FaultStack, MiB, VM1_WEB_BATCH } from '../../faults/stack';

jest.setTimeout(60_000);

function freePort(): Promise<number> {
  return new Promise((resolve, reject) => {
    const s = net.createServer();
    s.once('error', reject);
    s.listen(0, '127.0.0.1', () => {
      const { port } = s.address() as net.AddressInfo;
      s.close(() => resolve(port));
    });
  });
}

function get(port: number, p: string, method = 'GET'): Promise<{ status: number; body: string }> {
  return new Promise((resolve, reject) => {
    const req = http.request({ host: '127.0.0.1', port, path: p, method }, (res) => {
      let body = '';
      res.setEncoding('utf8');
      res.on('data', (d: string) => (body += d));
      res.on('end', () => resolve({ status: res.statusCode ?? 0, body }));
    });
    req.on('error', reject);
    req.end();
  });
}

/** The value of one sample line `name{labels} value` (labels as written, in order). */
function sample(text: string, name: string, labels: Record<string, string>): number | undefined {
  for (const line of text.split('\n')) {
    const m = /^([a-z_]+)\{([^}]*)\} (\S+)$/.exec(line);
    if (!m || m[1] !== name) continue;
    const have = Object.fromEntries(
      [...m[2].matchAll(/([a-z_]+)="([^"]*)"/g)].map((x) => [x[1], x[2]]),
    );
    if (Object.entries(labels).every(([k, v]) => have[k] === v)) return Number(m[3]);
  }
  return undefined;
}

let s: FaultStack;
let guestPort: number;
let hostPort: number;

beforeAll(async () => {
  guestPort = await freePort();
  hostPort = await freePort();
  s = await FaultStack.started('metrics', [{ ...VM1_WEB_BATCH, metricsPort: guestPort }], {
    hostMetricsPort: hostPort,
  });
});

afterAll(async () => {
  await s?.teardown();
});

test('after a reclaim, both daemons count the notice and the graceful stop, and show the limits the kernel has', async () => {
  const before = await get(guestPort, '/metrics');
  expect(before.status).toBe(200);
  expect(sample(before.body, 'nestbroker_guest_notices_total', { kind: 'reclaim' })).toBe(
    undefined,
  );

  const n = await s.reclaim('vm1', '768MiB', 1, '30s');
  expect(n).toMatchObject({ state: 'done', outcome: { status: 'complete' } });
  expect(n.outcome!.projects.find((p) => p.name === 'batch')).toMatchObject({
    action: 'stopped',
    exit: 'graceful',
  });
  expect(s.count('vm1', 'batch', 'term')).toBe(1); // its SIGTERM handler ran

  const g = (await get(guestPort, '/metrics')).body;
  const labels = { guest: 'vm1', kind: 'reclaim', status: 'complete' };
  expect(sample(g, 'nestbroker_guest_notices_total', labels)).toBe(1);
  expect(sample(g, 'nestbroker_guest_notice_seconds_count', { kind: 'reclaim' })).toBe(1);
  expect(
    sample(g, 'nestbroker_guest_project_stops_total', { project: 'batch', exit: 'graceful' }),
  ).toBe(1);
  expect(sample(g, 'nestbroker_guest_project_stops_total', { project: 'web' })).toBe(undefined);
  // The limits it reports are the kernel's: web's memory.max is its v1 limit_in_bytes.
  const webMax = sample(g, 'nestbroker_guest_project_memory_limit_bytes', {
    project: 'web',
    limit: 'max',
  });
  expect(webMax).toBe(s.projectLimits('vm1', 'web').memoryMax);
  expect(sample(g, 'nestbroker_guest_project_cpu_limit_cpus', { project: 'web' })).toBeCloseTo(
    s.projectLimits('vm1', 'web').cpuMax,
    3,
  );
  expect(sample(g, 'nestbroker_guest_project_memory_bytes', { project: 'web' })).toBeGreaterThan(0);
  expect(sample(g, 'nestbroker_guest_allocation', { resource: 'memory_bytes' })).toBe(256 * MiB);

  const h = (await get(hostPort, '/metrics')).body;
  expect(
    sample(h, 'nestbroker_host_notices_total', { guest: 'vm1', kind: 'reclaim', state: 'done' }),
  ).toBe(1);
  expect(sample(h, 'nestbroker_host_cascade_seconds_count', { guest: 'vm1' })).toBe(1);
  expect(sample(h, 'nestbroker_host_project_stops_total', { guest: 'vm1', exit: 'graceful' })).toBe(
    1,
  );
  expect(sample(h, 'nestbroker_host_guest_connected', { guest: 'vm1' })).toBe(1);
  // The books: 1 GiB − 768 MiB.
  expect(
    sample(h, 'nestbroker_host_guest_granted', { guest: 'vm1', resource: 'memory_bytes' }),
  ).toBe(s.vmMemory('vm1'));
  expect(sample(h, 'nestbroker_host_guest_pending_notices', { guest: 'vm1' })).toBe(0);
});

test('only GET or HEAD /metrics is served', async () => {
  expect((await get(hostPort, '/')).status).toBe(404);
  expect((await get(hostPort, '/metrics', 'POST')).status).toBe(405);
  const head = await get(guestPort, '/metrics', 'HEAD');
  expect(head).toEqual({ status: 200, body: '' });
});

test('a port already taken is a CONFIG_INVALID naming the address, not a crash later', async () => {
  await expect(
    MetricsServer.listen(new Registry(), { host: '127.0.0.1', port: hostPort }, silentLogger()),
  ).rejects.toMatchObject({
    code: 'CONFIG_INVALID',
    message: expect.stringContaining(`:${hostPort}`),
  });
});
