/**
 * No module of the daemons imports itself back through others (docs/architecture.md, "Who
 * owns what": each part is found and changed in one place). A cycle, even of types only,
 * means two modules know each other; the way out is an interface in a module of its own
 * (as agent/guest/operator-target.ts is for the operator API and the agent).
 */
import fs from 'node:fs';
import path from 'node:path';

const ROOT = path.resolve(__dirname, '../../..');

function tsFiles(dir: string): string[] {
  const out: string[] = [];
  for (const e of fs.readdirSync(dir, { withFileTypes: true })) {
    const p = path.join(dir, e.name);
    if (e.isDirectory()) out.push(...tsFiles(p));
    else if (e.name.endsWith('.ts')) out.push(p);
  }
  return out;
}

/** The relative modules a file imports or re-exports (`import type` included). */
function importsOf(file: string, text: string): string[] {
  const out: string[] = [];
  for (const m of text.matchAll(/^\s*(?:import|export)\b[^'";]*?\bfrom\s+'(\.[^']+)'/gm)) {
    const target = path.resolve(path.dirname(file), m[1]);
    const found = [`${target}.ts`, path.join(target, 'index.ts')].find((c) => fs.existsSync(c));
    if (found) out.push(found);
  }
  return out;
}

/** Every cycle found by a depth-first walk, each as `a -> b -> a` (paths from the root). */
function cycles(edges: ReadonlyMap<string, readonly string[]>): string[] {
  const found: string[] = [];
  const state = new Map<string, 'open' | 'done'>();
  const stack: string[] = [];
  const visit = (f: string): void => {
    state.set(f, 'open');
    stack.push(f);
    for (const t of edges.get(f) ?? []) {
      if (state.get(t) === 'open')
        found.push(
          [...stack.slice(stack.indexOf(t)), t].map((x) => path.relative(ROOT, x)).join(' -> '),
        );
      else if (!state.has(t)) visit(t);
    }
    stack.pop();
    state.set(f, 'done');
  };
  for (const f of [...edges.keys()].sort()) if (!state.has(f)) visit(f);
  return found;
}

test('the cycle finder finds a cycle of three and none in a chain', () => {
  const a = path.join(ROOT, 'a.ts');
  const b = path.join(ROOT, 'b.ts');
  const c = path.join(ROOT, 'c.ts');
  expect(
    cycles(
      new Map([
        [a, [b]],
        [b, [c]],
        [c, [a]],
      ]),
    ),
  ).toEqual(['a.ts -> b.ts -> c.ts -> a.ts']);
  expect(
    cycles(
      new Map([
        [a, [b]],
        [b, [c]],
        [c, []],
      ]),
    ),
  ).toEqual([]);
});

test('a type-only import counts as an edge', () => {
  const file = path.join(ROOT, 'agent/guest/operator.ts');
  expect(importsOf(file, "import type { OperatorTarget } from './operator-target';")).toEqual([
    path.join(ROOT, 'agent/guest/operator-target.ts'),
  ]);
});

test('agent/ and cgroup-adapter/ have no import cycles', () => {
  const edges = new Map<string, string[]>();
  for (const dir of ['agent', 'cgroup-adapter'])
    for (const f of tsFiles(path.join(ROOT, dir)))
      edges.set(f, importsOf(f, fs.readFileSync(f, 'utf8')));
  expect(edges.size).toBeGreaterThan(50);
  expect(cycles(edges)).toEqual([]);
});
