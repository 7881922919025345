// grpc-web interop cases (after grpc/grpc-web test/interop/interop_client.js), shared by
// the Node clients (grpcweb_node_client.js) and the browser page (tests/browser/page.js).
// No codegen: grpc.testing's messages and services are described by a FileDescriptorProto
// built at runtime with @bufbuild/protobuf; a client is an adapter with one method,
// call(service, methodName, request, headers, timeoutMs) -> {code, message, responses,
// headers, trailers} (responses decoded, headers/trailers plain objects).
"use strict";

const { create, createFileRegistry, toBinary, fromBinary } = require("@bufbuild/protobuf");
const { FileDescriptorProtoSchema } = require("@bufbuild/protobuf/wkt");

const OPTIONAL = 1;
const REPEATED = 3;
const INT32 = 5;
const STRING = 9;
const MESSAGE = 11;
const BYTES = 12;

function field(name, number, type, extra) {
  return { name, number, type, label: OPTIONAL, ...extra };
}

function message(name, fields) {
  return { name, field: fields || [] };
}

const msg = (name) => ({ typeName: `.grpc.testing.${name}` });

const FILE = create(FileDescriptorProtoSchema, {
  name: "grpc/testing/interop.proto",
  package: "grpc.testing",
  syntax: "proto3",
  messageType: [
    message("Empty"),
    message("Payload", [field("body", 2, BYTES)]),
    message("EchoStatus", [field("code", 1, INT32), field("message", 2, STRING)]),
    message("SimpleRequest", [
      field("response_size", 2, INT32),
      field("payload", 3, MESSAGE, msg("Payload")),
      field("response_status", 7, MESSAGE, msg("EchoStatus")),
    ]),
    message("SimpleResponse", [field("payload", 1, MESSAGE, msg("Payload"))]),
    message("ResponseParameters", [field("size", 1, INT32)]),
    message("StreamingOutputCallRequest", [
      field("response_parameters", 2, MESSAGE, { ...msg("ResponseParameters"), label: REPEATED }),
      field("payload", 3, MESSAGE, msg("Payload")),
      field("response_status", 7, MESSAGE, msg("EchoStatus")),
    ]),
    message("StreamingOutputCallResponse", [field("payload", 1, MESSAGE, msg("Payload"))]),
  ],
  service: [
    {
      name: "TestService",
      method: [
        { name: "EmptyCall", inputType: ".grpc.testing.Empty", outputType: ".grpc.testing.Empty" },
        { name: "UnaryCall", inputType: ".grpc.testing.SimpleRequest", outputType: ".grpc.testing.SimpleResponse" },
        {
          name: "StreamingOutputCall",
          inputType: ".grpc.testing.StreamingOutputCallRequest",
          outputType: ".grpc.testing.StreamingOutputCallResponse",
          serverStreaming: true,
        },
        { name: "UnimplementedCall", inputType: ".grpc.testing.Empty", outputType: ".grpc.testing.Empty" },
      ],
    },
    {
      name: "UnimplementedService",
      method: [{ name: "UnimplementedCall", inputType: ".grpc.testing.Empty", outputType: ".grpc.testing.Empty" }],
    },
  ],
});

const registry = createFileRegistry(FILE, () => undefined);
const file = registry.getFile("grpc/testing/interop.proto");
const TestService = file.services.find((s) => s.name === "TestService");
const UnimplementedService = file.services.find((s) => s.name === "UnimplementedService");

function method(service, name) {
  const found = service.methods.find((m) => m.name === name);
  if (!found) throw new Error(`no method ${name}`);
  return found;
}

// For clients that take serialisers (Google's grpc-web runtime).
function serializer(desc) {
  return (value) => toBinary(desc, create(desc, value));
}

function deserializer(desc) {
  return (bytes) => fromBinary(desc, bytes);
}

const ECHO_INITIAL = "x-grpc-test-echo-initial";
const ECHO_TRAILING = "x-grpc-test-echo-trailing-bin";
const INITIAL_VALUE = "test_initial_metadata_value";
const TRAILING_VALUE = "q6ur"; // base64 of 0xababab

function bodySize(response) {
  return response.payload && response.payload.body ? response.payload.body.length : 0;
}

function expect(condition, text) {
  if (!condition) throw new Error(text);
}

function expectOk(result) {
  expect(result.code === 0, `status ${result.code}: ${result.message}`);
}

// name -> async (client) => void (throws on a mismatch)
const CASES = {
  async empty_unary(client) {
    const result = await client.call(TestService, "EmptyCall", {}, {});
    expectOk(result);
    expect(result.responses.length === 1, `${result.responses.length} responses`);
  },
  async empty_unary_with_deadline(client) {
    const result = await client.call(TestService, "EmptyCall", {}, {}, 5000);
    expectOk(result);
  },
  async large_unary(client) {
    const request = { responseSize: 314159, payload: { body: new Uint8Array(271828) } };
    const result = await client.call(TestService, "UnaryCall", request, {});
    expectOk(result);
    expect(bodySize(result.responses[0]) === 314159, `body of ${bodySize(result.responses[0])} bytes`);
  },
  async server_streaming(client) {
    const sizes = [31415, 9, 2653, 58979];
    const request = { responseParameters: sizes.map((size) => ({ size })) };
    const result = await client.call(TestService, "StreamingOutputCall", request, {});
    expectOk(result);
    const got = result.responses.map(bodySize);
    expect(JSON.stringify(got) === JSON.stringify(sizes), `sizes ${got}`);
  },
  async server_streaming_1000(client) {
    const sizes = Array.from({ length: 1000 }, (_, i) => (i % 97) + 1);
    const request = { responseParameters: sizes.map((size) => ({ size })) };
    const result = await client.call(TestService, "StreamingOutputCall", request, {});
    expectOk(result);
    const got = result.responses.map(bodySize);
    expect(JSON.stringify(got) === JSON.stringify(sizes), `${got.length} responses, sizes differ`);
  },
  async custom_metadata(client) {
    const headers = { [ECHO_INITIAL]: INITIAL_VALUE, [ECHO_TRAILING]: TRAILING_VALUE };
    const request = { responseSize: 1, payload: { body: new Uint8Array(1) } };
    for (const [name, args] of [["UnaryCall", request], ["StreamingOutputCall", { responseParameters: [{ size: 1 }] }]]) {
      const result = await client.call(TestService, name, args, headers);
      expectOk(result);
      expect(result.headers[ECHO_INITIAL] === INITIAL_VALUE, `${name}: initial ${JSON.stringify(result.headers)}`);
      expect(result.trailers[ECHO_TRAILING] === TRAILING_VALUE, `${name}: trailing ${JSON.stringify(result.trailers)}`);
    }
  },
  async status_code_and_message(client) {
    const request = { responseStatus: { code: 2, message: "test status message" } };
    const result = await client.call(TestService, "UnaryCall", request, {});
    expect(result.code === 2, `code ${result.code} ${result.message}`);
    expect(result.message === "test status message", `message ${JSON.stringify(result.message)}`);
  },
  async unimplemented_method(client) {
    const result = await client.call(TestService, "UnimplementedCall", {}, {});
    expect(result.code === 12, `code ${result.code} ${result.message}`);
  },
  async unimplemented_service(client) {
    const result = await client.call(UnimplementedService, "UnimplementedCall", {}, {});
    expect(result.code === 12, `code ${result.code} ${result.message}`);
  },
};

const CASE_TIMEOUT_MS = 20000;

// Runs the named cases (all by default); case name -> "ok" or the failure's text.
async function runCases(client, names) {
  const report = {};
  for (const name of names || Object.keys(CASES)) {
    let timer;
    const timeout = new Promise((_, reject) => {
      timer = setTimeout(() => reject(new Error(`timed out after ${CASE_TIMEOUT_MS} ms`)), CASE_TIMEOUT_MS);
    });
    try {
      await Promise.race([CASES[name](client), timeout]);
      report[name] = "ok";
    } catch (error) {
      report[name] = String(error && error.stack ? error.stack : error);
    } finally {
      clearTimeout(timer);
    }
  }
  return report;
}

function headersToObject(headers) {
  const out = {};
  headers.forEach((value, key) => {
    out[key] = value;
  });
  return out;
}

// Connect (connect-node or connect-web): any grpc-web transport.
function connectClient(connect, transport) {
  return {
    async call(service, name, request, headers, timeoutMs) {
      const desc = method(service, name);
      const result = { code: 0, message: "", responses: [], headers: {}, trailers: {} };
      try {
        if (desc.methodKind === "server_streaming") {
          const call = transport.stream(desc, undefined, timeoutMs, headers, singleInput(create(desc.input, request)));
          const response = await call;
          result.headers = headersToObject(response.header);
          for await (const item of response.message) result.responses.push(item);
          result.trailers = headersToObject(response.trailer);
        } else {
          const response = await transport.unary(desc, undefined, timeoutMs, headers, create(desc.input, request));
          result.headers = headersToObject(response.header);
          result.responses.push(response.message);
          result.trailers = headersToObject(response.trailer);
        }
      } catch (error) {
        const failure = connect.ConnectError.from(error);
        result.code = failure.code;
        result.message = failure.rawMessage;
        result.trailers = headersToObject(failure.metadata);
      }
      return result;
    },
  };
}

async function* singleInput(message) {
  yield message;
}

// Google's grpc-web runtime (GrpcWebClientBase), format "text" or "binary".
function grpcWebClient(grpcWeb, baseUrl, format) {
  const client = new grpcWeb.GrpcWebClientBase({ format });
  return {
    call(service, name, request, headers, timeoutMs) {
      const desc = method(service, name);
      const streaming = desc.methodKind === "server_streaming";
      const descriptor = new grpcWeb.MethodDescriptor(
        `/${service.typeName}/${name}`,
        streaming ? grpcWeb.MethodType.SERVER_STREAMING : grpcWeb.MethodType.UNARY,
        Object,
        Object,
        serializer(desc.input),
        deserializer(desc.output),
      );
      const metadata = { ...headers };
      if (timeoutMs) metadata.deadline = String(Date.now() + timeoutMs);
      const url = `${baseUrl}/${service.typeName}/${name}`;
      return new Promise((resolve) => {
        const result = { code: 0, message: "", responses: [], headers: {}, trailers: {} };
        let settled = false;
        const settle = () => {
          if (!settled) {
            settled = true;
            resolve(result);
          }
        };
        const stream = streaming
          ? client.serverStreaming(url, request, metadata, descriptor)
          : client.rpcCall(url, request, metadata, descriptor, (error, response) => {
              if (error) {
                result.code = error.code;
                result.message = error.message;
              } else {
                result.responses.push(response);
              }
              settle();
            });
        stream.on("metadata", (m) => (result.headers = { ...m }));
        if (streaming) stream.on("data", (response) => result.responses.push(response));
        stream.on("status", (status) => {
          result.trailers = { ...(status.metadata || {}) };
          if (status.code !== 0) {
            result.code = status.code;
            result.message = status.details;
          }
          if (streaming && status.code !== 0) settle();
        });
        stream.on("error", (error) => {
          result.code = error.code;
          result.message = error.message;
          settle();
        });
        if (streaming) stream.on("end", settle);
      });
    },
  };
}

module.exports = { CASES, runCases, connectClient, grpcWebClient, TestService, UnimplementedService };
