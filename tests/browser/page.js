// The browser side of tests/browser/test_browser_grpc_web.py, bundled with esbuild:
// runs the grpc-web interop cases with connect-web (fetch, binary) and Google's grpc-web
// runtime (XHR, text and binary) against the bridges named in ?plan=..., then PUTs the
// report to /result on the page's own origin (the bridges are other origins: CORS).
"use strict";

const { runCases, connectClient, grpcWebClient, TestService } = require("../node/grpcweb_interop.js");
const connect = require("@connectrpc/connect");
const { createGrpcWebTransport } = require("@connectrpc/connect-web");
const grpcWeb = require("grpc-web");

function makeClient(kind, baseUrl) {
  if (kind === "connect-web") return connectClient(connect, createGrpcWebTransport({ baseUrl }));
  if (kind === "grpcweb-text") return grpcWebClient(grpcWeb, baseUrl, "text");
  if (kind === "grpcweb-binary") return grpcWebClient(grpcWeb, baseUrl, "binary");
  throw new Error(`unknown client ${kind}`);
}

async function main() {
  const plan = JSON.parse(new URLSearchParams(location.search).get("plan"));
  const report = {};
  for (const item of plan) {
    const client = makeClient(item.client, item.baseUrl);
    if (item.refusedOrigin) {
      const result = await client.call(TestService, "EmptyCall", {}, {});
      report[item.label] = { code: result.code, message: result.message };
    } else {
      report[item.label] = await runCases(client, item.cases);
    }
  }
  return report;
}

function put(body) {
  return fetch("/result", { method: "PUT", body: JSON.stringify(body) });
}

main().then(put, (error) => put({ fatal: String(error && error.stack ? error.stack : error) }));
