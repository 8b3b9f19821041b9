/**
 * Prometheus metrics (docs/architecture.md, "Observability"): each daemon may serve its own
 * registry as text on `GET /metrics` (config `metrics: {host, port}`; off when absent). Off
 * by default: nothing listens and nothing is counted that a scrape would not read, so the
 * idle footprint (docs/performance.md) is unchanged.
 *
 * With metrics on, each registry also has `nestbroker_build_info` and Node's process
 * metrics (prom-client's collectDefaultMetrics: CPU, RSS, heap, event-loop lag, GC). Their
 * timers cost a little CPU all the time, which is why they exist only when metrics are on
 * (the idle budget of docs/performance.md holds with metrics off).
 */
import { readFileSync } from 'node:fs';
import http from 'node:http';
import type { AddressInfo } from 'node:net';
import path from 'node:path';
import { collectDefaultMetrics, Gauge, Registry } from 'prom-client';
import { NestError } from './errors';
import type { Logger } from './log';

/** package.json's version (the installed tree has it at lib/nestbroker/package.json). */
export function nestbrokerVersion(): string {
  for (const rel of ['../../../package.json', '../../package.json']) {
    try {
      const pkg = JSON.parse(readFileSync(path.join(__dirname, rel), 'utf8')) as {
        name?: string;
        version?: string;
      };
      if (pkg.name === 'nestbroker' && typeof pkg.version === 'string') return pkg.version;
    } catch {
      // not at this depth: dist/agent/common vs agent/common under ts-jest
    }
  }
  return 'unknown';
}

/**
 * What every daemon's registry carries besides its own metrics:
 * `nestbroker_build_info{version,node} 1` (node: the Node.js version running it) and
 * Node's process metrics, with prefix-free standard names (`process_cpu_seconds_total`,
 * `nodejs_eventloop_lag_seconds`, …).
 */
export function addProcessMetrics(registry: Registry): void {
  new Gauge({
    name: 'nestbroker_build_info',
    help: 'Always 1: the nestbroker version and the Node.js version running it',
    labelNames: ['version', 'node'],
    registers: [registry],
  }).set({ version: nestbrokerVersion(), node: process.versions.node }, 1);
  collectDefaultMetrics({ register: registry });
}

export interface MetricsListen {
  host: string;
  /** 0: any free port (tests); the one taken is in `address` and the log. */
  port: number;
}

/** Buckets for latencies in seconds, from a 10 ms cascade to a 10-minute deadline. */
export const LATENCY_BUCKETS = [0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300, 600];

export class MetricsServer {
  private constructor(
    private readonly server: http.Server,
    readonly address: { host: string; port: number },
  ) {}

  /** Serves `registry` on http://host:port/metrics; rejects with CONFIG_INVALID if it cannot bind. */
  static async listen(registry: Registry, at: MetricsListen, log: Logger): Promise<MetricsServer> {
    const server = http.createServer((req, res) => {
      const url = (req.url ?? '/').split('?')[0];
      if (req.method !== 'GET' && req.method !== 'HEAD') {
        res.writeHead(405, { Allow: 'GET, HEAD' }).end();
        return;
      }
      if (url !== '/metrics') {
        res.writeHead(404, { 'Content-Type': 'text/plain' }).end('only /metrics is served\n');
        return;
      }
      registry.metrics().then(
        (text) => {
          res.writeHead(200, { 'Content-Type': registry.contentType });
          res.end(req.method === 'HEAD' ? undefined : text);
        },
        (err: unknown) => {
          log.error({ err }, 'collecting metrics failed');
          res.writeHead(500, { 'Content-Type': 'text/plain' }).end('collecting metrics failed\n');
        },
      );
    });
    // A scrape is small; a peer that trickles its request is cut off.
    server.requestTimeout = 10_000;
    server.headersTimeout = 5_000;
    await new Promise<void>((resolve, reject) => {
      server.once('error', (err: NodeJS.ErrnoException) =>
        reject(
          new NestError(
            'CONFIG_INVALID',
            `metrics: cannot listen on ${at.host}:${at.port}: ${err.code ?? err.message}`,
            { problems: [{ field: 'metrics', value: at, message: err.message }], cause: err },
          ),
        ),
      );
      server.listen(at.port, at.host, () => resolve());
    });
    const addr = server.address() as AddressInfo;
    log.info({ host: addr.address, port: addr.port }, 'metrics served on /metrics');
    return new MetricsServer(server, { host: addr.address, port: addr.port });
  }

  async close(): Promise<void> {
    this.server.closeAllConnections();
    await new Promise<void>((resolve) => this.server.close(() => resolve()));
  }
}
