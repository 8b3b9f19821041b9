/**
 * A per-run cgroup root for tests, in every hierarchy, that is always cleaned up.
 *
 *   const t = await openTestAdapter('mytest');
 *   afterAll(() => t.dispose());
 *   await t.adapter.create('web', { memory: { max: 64 * 2 ** 20 } });
 *
 * The root is `nestbroker-test-<pid>-<suffix>` below each hierarchy's mount (here
 * /sys/fs/cgroup/unified/… and /sys/fs/cgroup/{memory,cpu,cpuacct,cpuset,pids}/…), the
 * only place tests may create cgroups (CONTRIBUTING.md). The driver is auto-detected
 * unless `opts.driver` says otherwise. `dispose()` kills every process left inside (by
 * cgroup, never by name) and removes the whole root from every hierarchy; it is safe to
 * call twice. Without a suffix, a counter keeps roots of one process apart.
 *
 * Needs root and a cgroup2 mount: it throws (never skips) otherwise, so CI fails loudly.
 */
import { type CgroupDriver, type OpenOptions, openCgroupAdapter } from '../../cgroup-adapter/index';
import type { CgroupAdapter } from '../../cgroup-adapter/types';

export interface TestAdapter {
  adapter: CgroupAdapter;
  /** The same object with the driver's extras: `paths(group)`, `hierarchies`, `capabilities`. */
  driver: CgroupDriver;
  rootName: string;
  dispose(): Promise<void>;
}

let counter = 0;

export async function openTestAdapter(
  suffix?: string,
  opts: Omit<OpenOptions, 'root' | 'create'> = {},
): Promise<TestAdapter> {
  if (process.getuid?.() !== 0) {
    throw new Error('cgroup tests must run as root (they create cgroups); run `make test` as root');
  }
  const rootName = `nestbroker-test-${process.pid}-${suffix ?? `t${++counter}`}`;
  const driver = await openCgroupAdapter({ ...opts, root: rootName, create: true });
  let disposed = false;
  return {
    adapter: driver,
    driver,
    rootName,
    async dispose() {
      if (disposed) return;
      disposed = true;
      await driver.removeRoot(10_000);
    },
  };
}
