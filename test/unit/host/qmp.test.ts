/**
 * The host broker's QMP client against recorded QEMU conversations replayed on a real
 * unix socket (QEMU itself runs in the e2e issue's test).
 */
import { QmpClient, withQmp } from '../../../agent/host/qmp';
import { isNestError } from '../../../agent/common/errors';
import { startQmpReplay, type QmpReplay } from './qmp-replay';

const MiB = 1024 * 1024;
let replay: QmpReplay | null = null;
afterEach(async () => {
  await replay?.close();
  replay = null;
});
const noSleep = (): Promise<void> => new Promise((r) => setImmediate(r));

test('shrinking a guest: greeting, capabilities, balloon, then polls until actual reaches the target', async () => {
  replay = await startQmpReplay('balloon-shrink.jsonl');
  const result = await withQmp(
    replay.socketPath,
    async (q) => {
      expect(q.greeting?.version?.qemu).toEqual({ major: 7, minor: 2, micro: 0 });
      const r = await q.balloonTo(512 * MiB, { timeoutMs: 5000, pollMs: 1 });
      // Events arrived between replies; they were collected, never taken for a reply.
      expect(q.events.map((e) => e.event)).toEqual(['BALLOON_CHANGE', 'BALLOON_CHANGE']);
      return r;
    },
    { sleep: noSleep },
  );
  expect(result).toMatchObject({
    targetBytes: 512 * MiB,
    actualBytes: 512 * MiB,
    reached: true,
    polls: 3,
  });
  expect(replay.mismatches).toEqual([]);
  expect(replay.received.map((c) => c.execute)).toEqual([
    'qmp_capabilities',
    'balloon',
    'query-balloon',
    'query-balloon',
    'query-balloon',
  ]);
});

test('growing a guest back is confirmed by one query when the guest answers at once', async () => {
  replay = await startQmpReplay('balloon-grow.jsonl');
  const r = await withQmp(replay.socketPath, (q) => q.balloonTo(1024 * MiB, { timeoutMs: 5000 }));
  expect(r).toMatchObject({ actualBytes: 1024 * MiB, reached: true, polls: 1 });
  expect(replay.mismatches).toEqual([]);
});

test('a balloon that stalls (the guest cannot give the memory back) is reported short, bounded by the timeout', async () => {
  replay = await startQmpReplay('balloon-stalled.jsonl');
  let clock = 0;
  const r = await withQmp(
    replay.socketPath,
    (q) => q.balloonTo(300 * MiB, { timeoutMs: 2000, pollMs: 500 }),
    {
      now: () => clock,
      sleep: async (ms) => {
        clock += ms;
      },
    },
  );
  expect(r.reached).toBe(false);
  expect(r.actualBytes).toBe(739246080); // ~705 MiB, as measured under QEMU
  expect(r.polls).toBe(5); // t=0, 500, 1000, 1500, 2000
  expect(r.ms).toBe(2000);
});

test('a VM without a balloon device: QEMU error class and text come back as QMP_ERROR', async () => {
  replay = await startQmpReplay('no-balloon-device.jsonl');
  const q = new QmpClient(replay.socketPath);
  await q.connect();
  const err = await q.balloon(512 * MiB).catch((e: unknown) => e);
  expect(isNestError(err, 'QMP_ERROR')).toBe(true);
  expect((err as Error).message).toContain('DeviceNotActive');
  // The connection stays usable after an error reply.
  await expect(q.queryBalloon()).rejects.toMatchObject({ code: 'QMP_ERROR' });
  q.close();
});

test('no QEMU listening: connect fails with QMP_ERROR naming the socket', async () => {
  const q = new QmpClient('/nonexistent/nb-qmp.sock', { timeoutMs: 1000 });
  await expect(q.connect()).rejects.toMatchObject({ code: 'QMP_ERROR' });
  q.close();
});

test('a silent peer (no greeting) times out instead of hanging', async () => {
  const net = await import('node:net');
  const os = await import('node:os');
  const path = await import('node:path');
  const fs = await import('node:fs/promises');
  const dir = await fs.mkdtemp(path.join(os.tmpdir(), 'nb-qmp-silent-'));
  const sockPath = path.join(dir, 's');
  const conns: import('node:net').Socket[] = [];
  const server = net.createServer((s) => conns.push(s));
  await new Promise<void>((r) => server.listen(sockPath, r));
  const q = new QmpClient(sockPath, { timeoutMs: 200 });
  await expect(q.connect()).rejects.toMatchObject({ code: 'TIMEOUT' });
  q.close();
  conns.forEach((c) => c.destroy());
  await new Promise<void>((r) => server.close(() => r()));
  await fs.rm(dir, { recursive: true, force: true });
});
