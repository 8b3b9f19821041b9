/**
 * The project side (docs/project-protocol.md): what the guest agent tells the projects it
 * runs, in `<runDir>/projects/<name>/notice.json` and on the project socket. The guest's
 * ProjectNotice type is `z.infer` of ProjectNoticeSchema, and the JSON Schemas of
 * docs/schemas/project-*.json are generated from these (`make schemas`).
 *
 * Unlike the host↔guest channel, the project socket is lenient about what projects send
 * (any extra field is ignored: a project's client is a few lines of someone's shell or
 * Python, and a project is never trusted with more than ending its own grace early), and
 * every agent → project message may gain fields: a project must ignore those it does not
 * know. Hence `.passthrough()` on the objects, `additionalProperties: true` in the JSON
 * Schemas.
 */
import { z } from 'zod';
import { ID_PATTERN, NoticeSchema, ProjectLimitsSchema } from './schemas';

/** Lines on the project socket, with their '\n' (agent/guest/project-notices.ts). */
export const MAX_PROJECT_LINE_BYTES = 4096;

const projectName = z.string().regex(ID_PATTERN).describe('the project, as named in guest.yaml');
const noticeId = z.string().min(1).max(128).describe('the id of the host notice (notice.id)');

const ProjectNoticeShape = z.object({
  notice: NoticeSchema.describe('the notice from the host, whole and unchanged'),
  project: projectName,
  action: z
    .enum(['unchanged', 'shrunk', 'stopped', 'grown', 'started'])
    .describe('what the guest agent will do to this project'),
  limits: ProjectLimitsSchema.describe('the project limits once the action is done'),
  gracePeriodMs: z
    .number()
    .int()
    .nonnegative()
    .describe('how long the project has before it is shrunk or stopped'),
  deadline: z.string().datetime({ offset: true }).describe('the host notice deadline'),
  reason: z.string().max(1024).describe('why, in words, for logs'),
});

export const ProjectNoticeSchema = ProjectNoticeShape.passthrough().describe(
  'notice.json, and the `notice` of a notice message on the project socket',
);

const token = z.string().min(1).max(256).describe('the contents of the project token file');

export const ProjectHelloSchema = z
  .object({ type: z.literal('hello'), project: projectName, token })
  .passthrough()
  .describe('project → agent: who this connection speaks for');

export const ProjectDoneSchema = z
  .object({ type: z.literal('done'), noticeId })
  .passthrough()
  .describe('project → agent: ready for this notice, end its grace period now');

export const ProjectWelcomeSchema = z
  .object({ type: z.literal('welcome'), project: projectName })
  .passthrough()
  .describe('agent → project: the hello was accepted');

export const ProjectNoticeMsgSchema = z
  .object({ type: z.literal('notice'), notice: ProjectNoticeSchema })
  .passthrough()
  .describe('agent → project: a project notice (also the latest one, right after welcome)');

export const ProjectAckSchema = z
  .object({ type: z.literal('ack'), noticeId })
  .passthrough()
  .describe('agent → project: the done was taken');

export const ProjectErrorSchema = z
  .object({ type: z.literal('error'), message: z.string() })
  .passthrough()
  .describe('agent → project: a line was refused; the connection stays');

/** What a project sends. */
export const ProjectInboundSchema = z
  .discriminatedUnion('type', [ProjectHelloSchema, ProjectDoneSchema])
  .describe('a line a project sends on the project socket');

/** What the agent sends a project. */
export const ProjectOutboundSchema = z
  .discriminatedUnion('type', [
    ProjectWelcomeSchema,
    ProjectNoticeMsgSchema,
    ProjectAckSchema,
    ProjectErrorSchema,
  ])
  .describe('a line the guest agent sends on the project socket');

/** The fields the agent writes (the schema lets a reader pass more). */
export type ProjectNotice = z.infer<typeof ProjectNoticeShape>;
