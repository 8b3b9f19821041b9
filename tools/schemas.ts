/**
 * The JSON Schemas of docs/schemas/, generated from the zod schemas that validate the
 * protocol at run time (agent/protocol/schemas.ts, agent/protocol/project-schemas.ts), so
 * a third party can check its messages without reading TypeScript (docs/protocol.md,
 * "JSON Schemas"). `make schemas` writes them; test/unit/protocol/json-schemas.test.ts
 * fails when the checked-in files differ from what this generates.
 *
 *   node dist/tools/schemas.js [--check] [dir]   (default dir: docs/schemas)
 *
 * Each file is self-contained (no $ref between files), JSON Schema draft-07 as
 * zod-to-json-schema writes it, the `.describe()` texts as descriptions.
 */
import { promises as fsp } from 'node:fs';
import path from 'node:path';
import type { ZodTypeAny } from 'zod';
import { zodToJsonSchema } from 'zod-to-json-schema';
import * as S from '../agent/protocol/schemas';
import * as P from '../agent/protocol/project-schemas';

/** File name (without .json) → schema, in the order docs/protocol.md lists them. */
export const SCHEMAS: Readonly<Record<string, ZodTypeAny>> = {
  message: S.MessageSchema,
  hello: S.HelloSchema,
  welcome: S.WelcomeSchema,
  notice: S.NoticeMsgSchema,
  restore: S.RestoreMsgSchema,
  ack: S.AckSchema,
  progress: S.ProgressSchema,
  outcome: S.OutcomeMsgSchema,
  'outcome-part': S.OutcomePartSchema,
  facts: S.FactsMsgSchema,
  cancel: S.CancelSchema,
  plan: S.PlanRequestSchema,
  'plan-result': S.PlanResultSchema,
  ping: S.PingSchema,
  pong: S.PongSchema,
  error: S.ErrorMsgSchema,
  'project-notice': P.ProjectNoticeSchema,
  'project-inbound': P.ProjectInboundSchema,
  'project-outbound': P.ProjectOutboundSchema,
};

// Typed loosely: inferring zodToJsonSchema's generics over these unions is too deep for tsc.
const toJson = zodToJsonSchema as unknown as (schema: ZodTypeAny, opts: object) => object;

/** Every schema as the text of its file (JSON, two-space indent, final newline). */
export function generate(): Map<string, string> {
  const out = new Map<string, string>();
  for (const [name, schema] of Object.entries(SCHEMAS)) {
    const json = toJson(schema, { $refStrategy: 'none', target: 'jsonSchema7' });
    const doc = { $id: `${name}.json`, title: name, ...json };
    out.set(`${name}.json`, `${JSON.stringify(doc, null, 2)}\n`);
  }
  return out;
}

async function main(argv: string[]): Promise<number> {
  const check = argv.includes('--check');
  const dir = argv.find((a) => !a.startsWith('--')) ?? path.join(__dirname, '../../docs/schemas');
  const files = generate();
  if (check) {
    const stale: string[] = [];
    for (const [file, text] of files) {
      const have = await fsp.readFile(path.join(dir, file), 'utf8').catch(() => null);
      if (have !== text) stale.push(file);
    }
    if (stale.length > 0) {
      console.error(`out of date in ${dir}: ${stale.join(', ')}: run 'make schemas'`);
      return 1;
    }
    return 0;
  }
  await fsp.mkdir(dir, { recursive: true });
  for (const [file, text] of files) await fsp.writeFile(path.join(dir, file), text);
  console.log(`wrote ${files.size} schemas to ${dir}`);
  return 0;
}

if (require.main === module)
  main(process.argv.slice(2)).then(
    (code) => process.exit(code),
    (err: unknown) => {
      console.error(err);
      process.exit(1);
    },
  );
