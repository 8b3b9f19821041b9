/**
 * Systemd delegation (`root: {self: true}`): a real process, started inside a group of
 * our test root (as systemd would start the agent in its Delegate=yes cgroup), opens the
 * adapter on its own cgroup and must move itself into the `agent` leaf first.
 * The child runs the adapter transpiled to plain JS in a temp dir (no build needed).
 */
import { mkdtempSync, readdirSync, readFileSync, rmSync, writeFileSync } from 'node:fs';
import * as os from 'node:os';
import * as path from 'node:path';
import * as ts from 'typescript';
import { openTestAdapter, type TestAdapter } from '../../helpers/cgroup-root';
import { Children, exited, output } from './util';

const SRC = path.join(__dirname, '..', '..', '..', 'cgroup-adapter');
let t: TestAdapter;
let js: string;
const kids = new Children();

beforeAll(async () => {
  t = await openTestAdapter('deleg');
  js = mkdtempSync(path.join(os.tmpdir(), 'nb-adapter-js-'));
  for (const f of readdirSync(SRC).filter((n) => n.endsWith('.ts'))) {
    const out = ts.transpileModule(readFileSync(path.join(SRC, f), 'utf8'), {
      compilerOptions: {
        module: ts.ModuleKind.CommonJS,
        target: ts.ScriptTarget.ES2022,
        esModuleInterop: true,
      },
    });
    writeFileSync(path.join(js, f.replace(/\.ts$/, '.js')), out.outputText);
  }
});
afterEach(() => kids.killAll());
afterAll(async () => {
  kids.killAll();
  await t?.dispose();
  if (js) rmSync(js, { recursive: true, force: true });
});

const CHILD = `
const { openCgroupAdapter } = require(process.argv[1] + '/index.js');
openCgroupAdapter({ root: { self: true }, driver: process.argv[2] }).then(async (a) => {
  process.stdout.write(JSON.stringify({ root: a.root, kind: a.kind, children: await a.children(''),
    cgroup: require('fs').readFileSync('/proc/self/cgroup', 'utf8') }));
}).catch((e) => { process.stderr.write(String(e.stack)); process.exit(1); });
`;

for (const driver of ['auto', 'v2'] as const) {
  it(`the agent claims its own cgroup and moves itself into agent/ first (driver ${driver})`, async () => {
    const g = `svc-${driver}`;
    await t.adapter.create(g);
    const c = await kids.start(t.adapter, g, process.execPath, ['-e', CHILD, js, driver], {
      ...process.env,
      NODE_PATH: path.join(SRC, '..', 'node_modules'),
    });
    let err = '';
    c.stderr?.on('data', (d: Buffer) => (err += d.toString()));
    const out = await output(c);
    expect({ code: (await exited(c)).code, err }).toEqual({ code: 0, err: '' });
    const r = JSON.parse(out) as { root: string; kind: string; children: string[]; cgroup: string };
    expect(r.root).toBe(t.driver.paths(g).unified);
    expect(r.children).toEqual(['agent']);
    expect(r.cgroup).toContain(`0::/${t.rootName}/${g}/agent\n`);
    if (r.kind === 'hybrid') {
      for (const ctl of ['memory', 'cpu', 'cpuacct', 'cpuset', 'pids']) {
        expect(r.cgroup).toMatch(new RegExp(`^\\d+:${ctl}:/${t.rootName}/${g}/agent$`, 'm'));
      }
    }
    await t.adapter.remove(g);
  });
}
