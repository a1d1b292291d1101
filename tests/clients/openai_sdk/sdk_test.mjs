// The official OpenAI Node SDK against the gateway's OpenAI-compatible HTTP
// API: models, completions and chat, unary and streaming, greedy text equal
// to the gRPC path's, and the SDK's error types for bad input, unknown
// models and auth.
//
// usage: node sdk_test.mjs BASE_URL TOKEN EXPECTED.json
//   EXPECTED.json: {"model", "prompt", "max_tokens", "completion": gRPC greedy
//   text of prompt, "messages", "chat": gRPC greedy text of the conversation}
import fs from "node:fs";
import OpenAI from "openai";

const [baseURL, token, expectedFile] = process.argv.slice(2);
const expected = JSON.parse(fs.readFileSync(expectedFile, "utf8"));
const client = new OpenAI({ baseURL, apiKey: token, maxRetries: 0, timeout: 60000 });
let failures = 0;

function check(name, ok, detail = "") {
  console.log(`${ok ? "ok" : "FAIL"}: ${name}${ok ? "" : ` ${detail}`}`);
  if (!ok) failures++;
}

async function expectError(name, type, status, promise, param) {
  try {
    await promise;
    check(name, false, "no error");
  } catch (e) {
    check(name, e instanceof type && e.status === status && (param === undefined || e.param === param),
          `${e?.constructor?.name} status=${e?.status} param=${e?.param}: ${e?.message}`);
  }
}

const models = await client.models.list();
const ids = [];
for await (const m of models) ids.push(m.id);
check("models.list names the served model", ids.length === 1 && ids[0] === expected.model,
      JSON.stringify(ids));

const completion = await client.completions.create({
  model: expected.model, prompt: expected.prompt, max_tokens: expected.max_tokens, temperature: 0,
});
check("completions.create: greedy text equals gRPC's",
      completion.choices[0].text === expected.completion,
      `${JSON.stringify(completion.choices[0].text)} != ${JSON.stringify(expected.completion)}`);
check("completions.create: usage", completion.usage.completion_tokens > 0 &&
      completion.usage.total_tokens ===
          completion.usage.prompt_tokens + completion.usage.completion_tokens,
      JSON.stringify(completion.usage));
check("completions.create: finish_reason", ["stop", "length"].includes(
      completion.choices[0].finish_reason), completion.choices[0].finish_reason);

const stream = await client.completions.create({
  model: expected.model, prompt: expected.prompt, max_tokens: expected.max_tokens, temperature: 0,
  stream: true,
});
let streamed = "";
let finish = null;
for await (const chunk of stream) {
  streamed += chunk.choices[0]?.text ?? "";
  finish = chunk.choices[0]?.finish_reason ?? finish;
}
check("completions.create stream: text equals gRPC's", streamed === expected.completion,
      JSON.stringify(streamed));
check("completions.create stream: finish_reason", finish === completion.choices[0].finish_reason,
      finish);

const chat = await client.chat.completions.create({
  model: expected.model, messages: expected.messages, max_tokens: expected.max_tokens,
  temperature: 0,
});
check("chat.completions.create: greedy text equals gRPC's",
      chat.choices[0].message.content === expected.chat,
      `${JSON.stringify(chat.choices[0].message.content)} != ${JSON.stringify(expected.chat)}`);
check("chat.completions.create: role", chat.choices[0].message.role === "assistant");

const chatStream = await client.chat.completions.create({
  model: expected.model, messages: expected.messages, max_tokens: expected.max_tokens,
  temperature: 0, stream: true, stream_options: { include_usage: true },
});
let chatText = "";
let usage = null;
let role = null;
for await (const chunk of chatStream) {
  role = role ?? chunk.choices[0]?.delta?.role ?? null;
  chatText += chunk.choices[0]?.delta?.content ?? "";
  usage = chunk.usage ?? usage;
}
check("chat.completions.create stream: text equals gRPC's", chatText === expected.chat,
      JSON.stringify(chatText));
check("chat.completions.create stream: role", role === "assistant", role);
check("chat.completions.create stream: usage", usage !== null &&
      usage.prompt_tokens === chat.usage.prompt_tokens &&
      usage.completion_tokens === chat.usage.completion_tokens, JSON.stringify(usage));

await expectError("bad input is BadRequestError naming the field", OpenAI.BadRequestError, 400,
  client.completions.create({ model: expected.model, prompt: "x", max_tokens: 0 }), "max_tokens");
await expectError("n > 1 is BadRequestError", OpenAI.BadRequestError, 400,
  client.completions.create({ model: expected.model, prompt: "x", n: 2 }), "n");
await expectError("bad input while streaming is BadRequestError", OpenAI.BadRequestError, 400,
  client.chat.completions.create({ model: expected.model, messages: [], stream: true }),
  "messages");
await expectError("unknown model is NotFoundError", OpenAI.NotFoundError, 404,
  client.completions.create({ model: "gpt-4o", prompt: "x" }), "model");
const stranger = new OpenAI({ baseURL, apiKey: "not-the-token", maxRetries: 0 });
await expectError("a wrong api key is AuthenticationError", OpenAI.AuthenticationError, 401,
  stranger.models.list());
await expectError("a wrong api key is AuthenticationError (chat)", OpenAI.AuthenticationError, 401,
  stranger.chat.completions.create({ model: expected.model, messages: expected.messages }));

if (failures > 0) {
  console.log(`sdk_test: ${failures} FAILED`);
  process.exit(1);
}
console.log("sdk_test: all passed");
