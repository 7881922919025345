// Runs the grpc-web interop cases against a bridge with one real Node client and prints
// one JSON line: {case: "ok" | failure}.
// usage: node grpcweb_node_client.js <connect-http1|connect-http2|grpcweb-binary|grpcweb-text> <baseUrl> [case...]
"use strict";

const { runCases, connectClient, grpcWebClient } = require("./grpcweb_interop.js");

function makeClient(kind, baseUrl) {
  if (kind === "connect-http1" || kind === "connect-http2") {
    const connect = require("@connectrpc/connect");
    const { createGrpcWebTransport } = require("@connectrpc/connect-node");
    const httpVersion = kind === "connect-http2" ? "2" : "1.1";
    return connectClient(connect, createGrpcWebTransport({ baseUrl, httpVersion }));
  }
  if (kind === "grpcweb-binary" || kind === "grpcweb-text") {
    // grpc-web's own interop tests run it in Node the same way: xhr2 as XMLHttpRequest.
    global.XMLHttpRequest = require("xhr2");
    const grpcWeb = require("grpc-web");
    return grpcWebClient(grpcWeb, baseUrl, kind === "grpcweb-text" ? "text" : "binary");
  }
  throw new Error(`unknown client ${kind}`);
}

async function main() {
  const [kind, baseUrl, ...names] = process.argv.slice(2);
  const report = await runCases(makeClient(kind, baseUrl), names.length ? names : undefined);
  process.stdout.write(JSON.stringify(report) + "\n");
  process.exit(0); // keep-alive sockets must not hold the process open
}

main().catch((error) => {
  process.stderr.write(String(error && error.stack ? error.stack : error) + "\n");
  process.exit(1);
});
