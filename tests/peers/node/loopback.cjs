// Preload (`node --require ./loopback.cjs ...`): every TCP server in this process listens on
// 127.0.0.1 only, whatever host (or none) the program asked for, and announces where it listens.
//
// Why: server-everything calls `app.listen(PORT)`, which binds every interface; tests must stay on
// loopback. The announcement is one JSON line on stderr, {"event": "listening", "host", "port"},
// written once the socket listens, so a test waits for it instead of sleeping, and can ask for
// PORT=0 (a port the kernel picks, free by construction) and learn the real one here.
"use strict";

const net = require("node:net");

const LOOPBACK = "127.0.0.1";
const listen = net.Server.prototype.listen;

function isPort(value) {
  return typeof value === "number" || (typeof value === "string" && /^\d+$/.test(value));
}

function loopbackArgs(args) {
  const [first, ...rest] = args;
  if (first === undefined || typeof first === "function") {
    return [0, LOOPBACK, ...args.filter((arg) => arg !== undefined)];
  }
  if (isPort(first)) {
    // listen(port[, host][, backlog][, callback]): drop the host asked for, if any.
    const tail = typeof rest[0] === "string" ? rest.slice(1) : rest;
    return [first, LOOPBACK, ...tail];
  }
  if (first !== null && typeof first === "object" && !("path" in first) && !("fd" in first) && !("_handle" in first)
      && !("handle" in first)) {
    return [{ ...first, host: LOOPBACK, ipv6Only: false }, ...rest];
  }
  return args; // a Unix socket or an inherited handle: not a network interface
}

net.Server.prototype.listen = function loopbackListen(...args) {
  this.once("listening", () => {
    const address = this.address();
    if (address !== null && typeof address === "object") {
      process.stderr.write(`${JSON.stringify({ event: "listening", host: address.address, port: address.port })}\n`);
    }
  });
  return listen.apply(this, loopbackArgs(args));
};
