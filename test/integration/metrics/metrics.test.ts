/**
 * Prometheus metrics (docs/architecture.md, "Observability") from the real
 * daemons: a host broker and guest agents as processes, one reclaim that stops the
 * low-priority project and shrinks the other, then what each daemon's /metrics says,
 * checked against what really happened (the project's marker, the kernel's limit files,
 * the host's books). A second guest's QMP socket does not exist, so its VM actuation has a
 * failed balloon step, which must not be counted as done.
 */
import { promises as fsp } from 'node:fs';
import http from 'node:http';
import net from 'node:net';
import path from 'node:path';
import YAML from 'yaml';
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
  s = await FaultStack.create(
    'metrics',
    [
      { ...VM1_WEB_BATCH, metricsPort: guestPort },
      { name: 'vm2', projects: [{ name: 'solo', priority: 10, mode: 'graceful' }] },
    ],
    { hostMetricsPort: hostPort },
  );
  try {
    const host = YAML.parse(await fsp.readFile(s.stack.hostConfig, 'utf8')) as {
      guests: { name: string; qmp?: string }[];
    };
    host.guests.find((g) => g.name === 'vm2')!.qmp = path.join(s.dir, 'no-such-qmp.sock');
    await fsp.writeFile(s.stack.hostConfig, YAML.stringify(host));
    await s.startAll();
  } catch (err) {
    await s.teardown();
    throw err;
  }
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
  expect(sample(g, 'nestbroker_guest_allocation_memory_bytes', {})).toBe(256 * MiB);
  expect(sample(g, 'nestbroker_guest_allocation_cpus', {})).toBe(1);
  expect(g).not.toMatch(/^nestbroker_guest_allocation\{/m);

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
  expect(sample(h, 'nestbroker_host_guest_granted_memory_bytes', { guest: 'vm1' })).toBe(
    s.vmMemory('vm1'),
  );
  expect(sample(h, 'nestbroker_host_guest_granted_cpus', { guest: 'vm1' })).toBe(1);
  expect(sample(h, 'nestbroker_host_actuation_failures_total', { guest: 'vm1' })).toBe(undefined);
  expect(sample(h, 'nestbroker_host_guest_pending_notices', { guest: 'vm1' })).toBe(0);
});

test('a VM actuation with a failed step is counted as actuation_failed with its step, not done', async () => {
  const n = await s.reclaim('vm2', '256MiB', 0.5, '30s');
  // The guest did its part and the cgroup step ran; the balloon could not be reached.
  expect(n.state).toBe('done');
  expect(n.actuation!.errors).toEqual([
    expect.objectContaining({ step: 'balloon', code: 'QMP_ERROR' }),
  ]);
  expect(s.vmMemory('vm2')).toBe(768 * MiB);
  const h = (await get(hostPort, '/metrics')).body;
  const labels = { guest: 'vm2', kind: 'reclaim' };
  expect(sample(h, 'nestbroker_host_notices_total', { ...labels, state: 'done' })).toBe(undefined);
  expect(sample(h, 'nestbroker_host_notices_total', { ...labels, state: 'actuation_failed' })).toBe(
    1,
  );
  expect(
    sample(h, 'nestbroker_host_actuation_failures_total', {
      guest: 'vm2',
      step: 'balloon',
      code: 'QMP_ERROR',
    }),
  ).toBe(1);
  // vm1's reclaim, whose actuation had no failed step, is still done.
  expect(
    sample(h, 'nestbroker_host_notices_total', { guest: 'vm1', kind: 'reclaim', state: 'done' }),
  ).toBe(1);
});

test('each daemon says its version and Node version, and has Node process metrics', async () => {
  const pkg = JSON.parse(
    await fsp.readFile(path.join(__dirname, '../../../package.json'), 'utf8'),
  ) as { version: string };
  for (const port of [guestPort, hostPort]) {
    const body = (await get(port, '/metrics')).body;
    expect(
      sample(body, 'nestbroker_build_info', { version: pkg.version, node: process.versions.node }),
    ).toBe(1);
    expect(
      Number(/^process_resident_memory_bytes(?:\{[^}]*\})? (\d+)$/m.exec(body)?.[1]),
    ).toBeGreaterThan(10 * MiB);
    expect(body).toMatch(/^process_cpu_seconds_total(\{[^}]*\})? [\d.]+$/m);
    expect(body).toMatch(/^nodejs_eventloop_lag_seconds(\{[^}]*\})? [\d.e-]+$/m);
  }
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
