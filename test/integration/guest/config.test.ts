/**
 * A bad config is refused at start: the real `nestbroker guest` exits 2, stderr lists
 * every problem (each field named), and nothing is created: no cgroup, no state, no socket.
 */
import { existsSync, promises as fsp } from 'node:fs';
import * as path from 'node:path';
import { openTestAdapter, type TestAdapter } from '../../helpers/cgroup-root';
import { ensureBuilt, makeEnv, startAgent, type Env } from './harness';

let t: TestAdapter;
let env: Env;

beforeAll(async () => {
  ensureBuilt();
  t = await openTestAdapter('guest-config');
  env = await makeEnv();
});

afterAll(async () => {
  await t?.dispose();
  if (env) await fsp.rm(env.dir, { recursive: true, force: true });
});

test('every problem is listed, the exit code is 2, and nothing is created', async () => {
  await fsp.writeFile(
    env.configFile,
    [
      'guest: vm1',
      `stateDir: ${env.stateDir}`,
      `runDir: ${env.runDir}`,
      `socket: ${env.socket}`,
      `cgroup: { root: ${t.rootName}/guest }`,
      'upstream: { transport: none }',
      'colour: blue',
      'projects:',
      '  - name: Web!',
      '    priority: high',
      '    memory: { min: 2GiB, max: "-1" }',
      '    cpu: { min: 0.5, max: 1, weight: 0 }',
      '    stop: { signal: SIGFOO, gracePeriod: soon }',
      '    command: { argv: [/bin/sleep, "1000"] }',
      '  - name: batch',
      '    priority: 1',
      '    memory: { min: 1GiB, max: 512MiB }',
    ].join('\n'),
  );
  const agent = startAgent(env);
  expect(await agent.exited).toBe(2);
  const err = agent.stderr();
  for (const field of [
    'projects[0].name',
    'projects[0].priority',
    'projects[0].memory.max',
    'projects[0].cpu.weight',
    'projects[0].stop.signal',
    'projects[0].stop.gracePeriod',
    'colour',
    'projects[1].memory.min',
    'projects[1].command',
  ])
    expect(err).toContain(`${field}:`);
  expect(err).toContain('"-1"'); // the value received is named
  expect(await t.adapter.exists('guest')).toBe(false);
  expect(existsSync(env.stateDir)).toBe(false);
  expect(existsSync(env.socket)).toBe(false);
  expect(existsSync(path.join(env.runDir, 'projects'))).toBe(false);
});

test('a missing config file is refused the same way', async () => {
  await fsp.rm(env.configFile, { force: true });
  const agent = startAgent(env);
  expect(await agent.exited).toBe(2);
  expect(agent.stderr()).toMatch(/cannot read the config \(ENOENT\)/);
});
