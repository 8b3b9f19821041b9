/**
 * `bench/graceful-vs-oom --real-guest` (docs/performance.md part 3, inside QEMU): ONE boot
 * of the real-guest test's Debian image (test/e2e/build-image.sh, test/e2e/vm.ts), and in
 * it the same squeeze of the same workload (test/e2e/scenario.ts: db 100, web 50, batch 10,
 * the balloon taking 1024 → 704 MiB) handled by
 *
 *   (a) nothing        the guest kernel's OOM killer
 *   (b) nestbroker     installed with `make install`, a real host broker, `reclaim 320MiB`
 *   (c) earlyoom       Debian's package, its defaults (/etc/default/earlyoom)
 *   (d) systemd-oomd   Debian's package, its defaults (oomd.conf and its drop-ins)
 *
 * N runs of each, interleaved (run 1 of every variant, then run 2, ...), each from a clean
 * slate with fresh projects. Counted per run from the guest kernel and the host's QMP: see
 * test/e2e/scenario.ts. Prints a table and writes bench/results/graceful-vs-oom-real-guest.json
 * (after every run, so an interrupted bench keeps what it measured). Logs of the guest:
 * test/e2e/out/bench/.
 */
import { promises as fsp } from 'node:fs';
import path from 'node:path';
import { Vm } from '../../test/e2e/vm';
import {
  LOWEST,
  REPO,
  SCENARIO,
  buildImage,
  cleanSlate,
  installNestbroker,
  packDeb,
  runNestbroker,
  runUnmanaged,
  sections,
  writeGuestConfig,
  type Variant,
  type VariantRun,
} from '../../test/e2e/scenario';
import { say, table, writeResult } from './common';
import { nestbrokerGoal, tallyVariants, totalsTable } from './squeeze-tally';

export interface RealGuestOptions {
  runs: number;
  variants: Variant[];
  /** How long a squeeze is watched before it counts as never freed. */
  squeezeBoundMs: number;
  out?: string;
}

const OUT = path.join(REPO, 'test/e2e/out/bench');
const NAME = 'graceful-vs-oom-real-guest';

function endedText(r: VariantRun): string {
  return (
    r.ended.map((e) => `${e.name}(${e.how}${e.marker ? ',saved' : ''}; ${e.by})`).join(' ') ||
    'none'
  );
}

function freeText(r: VariantRun): string | number {
  if (r.msUntilFree !== null) return r.msUntilFree;
  return `never: ${r.balloon.actualMiB} MiB after ${Math.round(r.balloon.ms / 1000)} s`;
}

export function totalsOf(results: VariantRun[], variants: readonly Variant[]) {
  return tallyVariants(results, variants).map((t) => {
    const rs = results.filter((r) => r.variant === t.variant);
    return {
      ...t,
      daemonActions: rs.reduce((s, r) => s + r.daemonActions.length, 0),
      softLockups: rs.reduce((s, r) => s + r.softLockups, 0),
    };
  });
}

export async function runRealGuest(o: RealGuestOptions): Promise<number> {
  const t0 = Date.now();
  await fsp.rm(OUT, { recursive: true, force: true });
  await fsp.mkdir(OUT, { recursive: true });
  say(
    `graceful-vs-oom, real guest: ${SCENARIO.projects.map((p) => `${p.name} (priority ${p.priority}, ${p.holdMiB} MiB)`).join(', ')}; ` +
      `the balloon takes ${SCENARIO.vmMemoryMiB} → ${SCENARIO.squeezedMiB} MiB; variants ${o.variants.join(', ')}; ${o.runs} run(s) each; ` +
      `a squeeze is watched for ${Math.round(o.squeezeBoundMs / 1000)} s; logs in ${OUT}`,
  );
  const image = await buildImage(OUT);
  say(`image ${image.dir} (${image.buildOrLookupMs} ms to build or find)`);

  let vm: Vm | undefined;
  const onSignal = (): void => {
    void (vm ? vm.destroy() : Promise.resolve()).finally(() => process.exit(130));
  };
  process.once('SIGINT', onSignal);
  process.once('SIGTERM', onSignal);
  const results: VariantRun[] = [];
  const failures: { variant: Variant; run: number; error: string }[] = [];
  const setup: Record<string, unknown> = {
    vmMemoryMiB: SCENARIO.vmMemoryMiB,
    squeezedMiB: SCENARIO.squeezedMiB,
    projects: SCENARIO.projects,
    lowestPriority: LOWEST,
    squeezeBoundMs: o.squeezeBoundMs,
    image,
  };
  const save = (final: boolean): string =>
    writeResult(
      NAME,
      {
        complete: final,
        runs: o.runs,
        variants: o.variants,
        setup,
        results,
        failures,
        totals: totalsOf(results, o.variants),
        goal: nestbrokerGoal(results),
        totalMs: Date.now() - t0,
      },
      o.out,
    );
  try {
    vm = await Vm.boot({ imageDir: image.dir, outDir: OUT, shareDir: REPO });
    setup.accel = vm.accel;
    setup.bootMs = vm.timings.bootMs;
    say(`booted in ${vm.timings.bootMs} ms (${vm.accel})`);
    const facts = await sections(vm, {
      kernel: 'uname -r',
      packages:
        "dpkg-query -W -f '${Package} ${Version}\\n' systemd earlyoom systemd-oomd dbus linux-base nodejs 2>/dev/null",
      swap: 'cat /proc/swaps',
      meminfo: 'head -3 /proc/meminfo',
      cgroup: 'stat -f -c %T /sys/fs/cgroup',
    });
    setup.guest = facts;
    if (o.variants.includes('nestbroker')) {
      const t = Date.now();
      await installNestbroker(vm, await packDeb(OUT));
      await writeGuestConfig(vm);
      setup.installMs = Date.now() - t;
      say(`nestbroker installed in the guest in ${setup.installMs as number} ms`);
    }
    for (let run = 1; run <= o.runs; run++) {
      for (const variant of o.variants) {
        const opts = { squeezeBoundMs: o.squeezeBoundMs, log: (l: string) => say(`  ${l}`) };
        try {
          const r =
            variant === 'nestbroker'
              ? await runNestbroker(vm, run, { ...opts, outDir: OUT })
              : await runUnmanaged(vm, variant, run, opts);
          results.push(r);
          say(
            `  ${variant} run ${run}: OOM kills ${r.oomKills}, ended ${endedText(r)}, ` +
              `lowest stopped ${r.lowestPriorityWasTheOneStopped ? 'yes' : 'no'}, work lost ${r.workLost}, ` +
              `until free ${freeText(r)} ms`,
          );
        } catch (e) {
          failures.push({ variant, run, error: e instanceof Error ? e.message : String(e) });
          say(`  ${variant} run ${run} FAILED: ${String(e)}`);
          if (failures.length >= 3) throw new Error('three runs failed: stopping');
        }
        save(false);
      }
    }
  } finally {
    process.off('SIGINT', onSignal);
    process.off('SIGTERM', onSignal);
    if (vm) {
      await cleanSlate(vm).catch(() => undefined);
      await vm.collectLogs();
      await vm.poweroff();
    }
  }

  say('\nevery run');
  say(
    table([
      [
        'variant',
        'run',
        'OOM kills',
        'daemon actions',
        'ended (how, by)',
        'graceful',
        'lowest stopped',
        'work lost',
        'ms until free',
      ],
      ...results.map((r) => [
        r.variant,
        r.run,
        r.oomKills,
        r.daemonActions.length,
        endedText(r),
        r.gracefulEnds,
        r.lowestPriorityWasTheOneStopped ? 'yes' : 'NO',
        r.workLost,
        freeText(r),
      ]),
    ]),
  );
  const totals = totalsOf(results, o.variants);
  say('\ntotals');
  say(totalsTable(totals));
  const goal = nestbrokerGoal(results);
  say(`\ngoal: ${goal.goal}: ${goal.met ? 'met' : 'NOT met'}`);
  if (failures.length) say(`failed runs: ${JSON.stringify(failures)}`);
  say(`\nwrote ${save(true)} (${Math.round((Date.now() - t0) / 1000)} s in all)`);
  return failures.length ? 1 : 0;
}
