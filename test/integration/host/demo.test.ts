/**
 * `make demo` as a test: the demo process runs for real (under a per-run cgroup root, never
 * the demo's own) and its last line, the JSON for scripts, must tell the whole story.
 */
import { spawnSync } from 'node:child_process';
import { existsSync } from 'node:fs';
import path from 'node:path';

const DEMO = path.resolve(__dirname, '../../../dist/demo/demo.js');

test('the demo reclaims from vm1 without an OOM kill, stops in priority order, lowers the VM after the outcome', () => {
  if (!existsSync(DEMO)) throw new Error(`${DEMO} is missing: run \`make build\` first`);
  const root = `nestbroker-test-${process.pid}-demo`;
  const r = spawnSync(process.execPath, [DEMO, '--root', root], {
    encoding: 'utf8',
    timeout: 120_000,
  });
  const lines = r.stdout.trim().split('\n');
  const last = JSON.parse(lines[lines.length - 1]);
  if (!last.ok) console.log(r.stdout, r.stderr);
  expect(r.status).toBe(0);
  expect(last).toMatchObject({ ok: true, oomKills: 0, vmLimitsLoweredAfterOutcome: true });
  const vm1 = last.projects.filter((p: { guest: string }) => p.guest === 'vm1');
  // Lowest priority gives first: batch and api stopped gracefully, web (highest) shrunk.
  expect(
    vm1.map((p: { name: string; action: string; exit: string | null }) => [
      p.name,
      p.action,
      p.exit,
    ]),
  ).toEqual([
    ['web', 'shrunk', null],
    ['api', 'stopped', 'graceful'],
    ['batch', 'stopped', 'graceful'],
  ]);
  const web = vm1[0];
  expect(web.memoryMaxAfter).toBeLessThan(web.memoryMaxBefore);
  // The other guest was not touched.
  for (const p of last.projects.filter((x: { guest: string }) => x.guest === 'vm2'))
    expect(p).toMatchObject({ action: 'unchanged', exit: null });
  expect(r.stdout).toContain('stopped, in order: batch (graceful), api (graceful)');
  // The demo removed its cgroups.
  expect(existsSync(`/sys/fs/cgroup/memory/${root}`)).toBe(false);
  expect(existsSync(`/sys/fs/cgroup/unified/${root}`)).toBe(false);
}, 150_000);
