// An MCP client built on the official TypeScript SDK, for gateway tests: connects to one
// streamable HTTP endpoint, runs a plan of steps, prints one JSON report on stdout.
//
//   node client.mjs URL 'PLAN'      PLAN: a JSON array of steps, e.g. [{"op": "listTools"}]
//
// Steps ("op" and its fields):
//   listTools | listResources | listPrompts   every page, following nextCursor
//   callTool {name, arguments}                 progress notifications are requested and recorded
//   cancelTool {name, arguments, afterProgress} aborts the call once that many progress
//                                              notifications arrived (the SDK then sends
//                                              notifications/cancelled)
//   readResource {uri} | getPrompt {name, arguments} | ping
//   terminate                                  DELETE of the session
// A step that fails records {"error": {"code", "message"}} and the plan goes on, so a test sees
// every outcome. The client answers sampling/createMessage and elicitation/create (form) with
// fixed answers and records every server-to-client request and notification it got.
import { Client } from "@modelcontextprotocol/sdk/client/index.js";
import { StreamableHTTPClientTransport } from "@modelcontextprotocol/sdk/client/streamableHttp.js";
import { CreateMessageRequestSchema, ElicitRequestSchema } from "@modelcontextprotocol/sdk/types.js";

const STEP_TIMEOUT_MS = 20_000;
const SAMPLED_TEXT = "sampled by the TypeScript client";
const ELICITED = { name: "Ada Lovelace", check: true };

function describe(error) {
  const code = typeof error?.code === "number" ? error.code : null;
  return { code, message: String(error?.message ?? error), name: error?.name ?? null };
}

async function allPages(list, key) {
  const items = [];
  let cursor;
  let pages = 0;
  do {
    const page = await list(cursor === undefined ? {} : { cursor }, { timeout: STEP_TIMEOUT_MS });
    pages += 1;
    items.push(...page[key]);
    cursor = page.nextCursor;
  } while (cursor && pages < 100);
  return { pages, items };
}

async function runStep(client, transport, step) {
  switch (step.op) {
    case "listTools": {
      const { pages, items } = await allPages((p, o) => client.listTools(p, o), "tools");
      return { pages, tools: items.map((tool) => tool.name) };
    }
    case "listResources": {
      const { pages, items } = await allPages((p, o) => client.listResources(p, o), "resources");
      return { pages, resources: items.map((resource) => resource.uri) };
    }
    case "listPrompts": {
      const { pages, items } = await allPages((p, o) => client.listPrompts(p, o), "prompts");
      return { pages, prompts: items.map((prompt) => prompt.name) };
    }
    case "callTool": {
      const progress = [];
      const result = await client.callTool({ name: step.name, arguments: step.arguments ?? {} }, undefined, {
        timeout: STEP_TIMEOUT_MS,
        onprogress: (update) => progress.push(update),
      });
      return { ...result, progress };
    }
    case "cancelTool": {
      const progress = [];
      const controller = new AbortController();
      const started = Date.now();
      try {
        await client.callTool({ name: step.name, arguments: step.arguments ?? {} }, undefined, {
          timeout: STEP_TIMEOUT_MS,
          signal: controller.signal,
          onprogress: (update) => {
            progress.push(update);
            if (progress.length >= (step.afterProgress ?? 1)) {
              controller.abort("the test client gave up");
            }
          },
        });
        return { cancelled: false, progress, elapsedMs: Date.now() - started };
      } catch (error) {
        return { cancelled: controller.signal.aborted, reason: describe(error), progress, elapsedMs: Date.now() - started };
      }
    }
    case "readResource":
      return await client.readResource({ uri: step.uri }, { timeout: STEP_TIMEOUT_MS });
    case "getPrompt":
      return await client.getPrompt({ name: step.name, arguments: step.arguments ?? {} }, { timeout: STEP_TIMEOUT_MS });
    case "ping":
      return await client.ping({ timeout: STEP_TIMEOUT_MS });
    case "terminate": {
      const sessionId = transport.sessionId;
      await transport.terminateSession();
      return { sessionId, after: transport.sessionId ?? null };
    }
    default:
      throw new Error(`unknown step ${JSON.stringify(step.op)}`);
  }
}

async function main() {
  const [url, planText] = process.argv.slice(2);
  if (!url || !planText) {
    throw new Error("usage: node client.mjs URL PLAN_JSON");
  }
  const plan = JSON.parse(planText);
  const serverRequests = [];
  const notifications = [];
  const transportErrors = [];
  const client = new Client(
    { name: "agentgate-ts-test-client", version: "1.0.0" },
    { capabilities: { sampling: {}, elicitation: { form: {} } } },
  );
  client.setRequestHandler(CreateMessageRequestSchema, async (request, extra) => {
    serverRequests.push({ method: request.method, id: extra.requestId, params: request.params });
    return { role: "assistant", model: "agentgate-test-model", stopReason: "endTurn", content: { type: "text", text: SAMPLED_TEXT } };
  });
  client.setRequestHandler(ElicitRequestSchema, async (request, extra) => {
    serverRequests.push({ method: request.method, id: extra.requestId, params: request.params });
    return { action: "accept", content: ELICITED };
  });
  client.fallbackNotificationHandler = async (notification) => {
    notifications.push(notification.method);
  };
  client.onerror = (error) => transportErrors.push(String(error?.message ?? error));

  const transport = new StreamableHTTPClientTransport(new URL(url));
  const report = { steps: [], serverRequests, notifications, transportErrors };
  await client.connect(transport, { timeout: STEP_TIMEOUT_MS });
  report.protocolVersion = transport.protocolVersion ?? null;
  report.sessionId = transport.sessionId ?? null;
  report.serverInfo = client.getServerVersion() ?? null;
  report.capabilities = client.getServerCapabilities() ?? null;
  report.instructions = client.getInstructions() ?? null;
  for (const step of plan) {
    try {
      report.steps.push({ op: step.op, result: await runStep(client, transport, step) });
    } catch (error) {
      report.steps.push({ op: step.op, error: describe(error) });
    }
  }
  await client.close();
  process.stdout.write(`${JSON.stringify(report)}\n`);
}

main().then(
  () => process.exit(0),
  (error) => {
    process.stdout.write(`${JSON.stringify({ fatal: describe(error) })}\n`);
    process.exit(1);
  },
);
