'use strict';
// The `ws` peer: the subset of chatd protocol v1 the bench uses (hello, create_group,
// create_dm, send, typing, set_presence, ping, sync), MessagePack frames, rooms in memory.
// A broadcast encodes the event once and sends the same buffer to every member socket.
const { WebSocketServer } = require('ws');
const { Packr, unpack } = require('msgpackr');
const { args, verify, Rooms } = require('../common');

const opts = args(process.argv);
const packr = new Packr({ useRecords: false });
const pack = (obj) => packr.pack(obj);
const rooms = new Rooms();
const sessions = new Map(); // user -> Set(ws)
const watchers = new Map(); // user -> Set(ws) subscribed to that user's presence

function deliver(room, frame) {
  for (const user of room.members) {
    const conns = sessions.get(user);
    if (conns) for (const ws of conns) ws.send(frame, { binary: true });
  }
}

function join(user, id) {
  // members are users; sockets are looked up at broadcast time
  rooms.rooms.get(id).members.add(user);
}

const handlers = {
  create_group(ws, cmd) {
    const members = [ws.user, ...(cmd.members || [])];
    const id = rooms.create(members);
    return { room: { room_id: id, kind: 'group', title: cmd.title, member_count: members.length, last_seq: 0 } };
  },
  create_dm(ws, cmd) {
    const id = rooms.dm(ws.user, cmd.user_id);
    return { room: { room_id: id, kind: 'dm', title: '', member_count: 2, last_seq: 0, peer: cmd.user_id } };
  },
  add_member(ws, cmd) { join(cmd.user_id, cmd.room_id); return { seq: 0 }; },
  send(ws, cmd) {
    const done = rooms.append(cmd.room_id, ws.user, cmd.body);
    if (!done) return { error: 'not_found' };
    deliver(done.room, pack(done.event));
    return { seq: done.event.seq, at: done.event.at, duplicate: false };
  },
  typing(ws, cmd) {
    const room = rooms.rooms.get(cmd.room_id);
    if (room) {
      const frame = pack({ type: 'typing', room_id: cmd.room_id, user_id: ws.user, active: !!cmd.active });
      for (const user of room.members) {
        if (user === ws.user) continue;
        const conns = sessions.get(user);
        if (conns) for (const c of conns) c.send(frame, { binary: true });
      }
    }
    return {};
  },
  subscribe_presence(ws, cmd) {
    const ids = cmd.user_ids || [];
    for (const u of ids) {
      if (!watchers.has(u)) watchers.set(u, new Set());
      watchers.get(u).add(ws);
      ws.watching.push(u);
    }
    return { presence: ids.map((u) => ({ user_id: u, status: sessions.has(u) ? 'online' : 'offline' })) };
  },
  set_presence(ws, cmd) {
    const set = watchers.get(ws.user);
    if (set) {
      const frame = pack({ type: 'presence', users: [{ user_id: ws.user, status: cmd.status === 'invisible' ? 'offline' : cmd.status }] });
      for (const w of set) w.send(frame, { binary: true });
    }
    return {};
  },
  ping() { return { now: Date.now() / 1000 }; },
  sync(ws, cmd) {
    const out = [];
    for (const [key, seq] of Object.entries(cmd.rooms || {})) {
      const room = rooms.rooms.get(Number(key));
      if (!room || !room.members.has(ws.user)) continue;
      const events = room.log.filter((e) => e.seq > seq);
      if (events.length) out.push({ room_id: Number(key), events, has_more: false, too_far_behind: false });
    }
    return { rooms: out, removed: [], added: [] };
  },
};

const wss = new WebSocketServer({ host: '127.0.0.1', port: opts.port, path: '/ws', perMessageDeflate: false, backlog: 4096 });
wss.on('connection', (ws) => {
  ws.user = null;
  ws.watching = [];
  ws.on('message', (data, isBinary) => {
    let cmd;
    try { cmd = unpack(data); } catch (e) { ws.send(pack({ type: 'error', id: null, code: 'bad_frame', message: '', details: {} })); return; }
    if (ws.user === null) {
      const user = cmd.type === 'hello' ? verify(cmd.token, opts.secret) : null;
      if (!user) { ws.send(pack({ type: 'error', id: cmd.id, code: 'unauthorized', message: '', details: {} })); ws.close(4003); return; }
      ws.user = user;
      if (!sessions.has(user)) sessions.set(user, new Set());
      sessions.get(user).add(ws);
      ws.send(pack({ type: 'welcome', id: cmd.id, session_id: String(Math.random()), server: 'ws-peer', protocol: 1, user: { id: user }, limits: {}, rooms: [], token_expires_at: 0 }));
      return;
    }
    const handler = handlers[cmd.type];
    if (!handler) { ws.send(pack({ type: 'error', id: cmd.id, code: 'unknown_command', message: '', details: {} })); return; }
    const result = handler(ws, cmd);
    if (result.error) ws.send(pack({ type: 'error', id: cmd.id, code: result.error, message: '', details: {} }));
    else ws.send(pack({ type: 'result', id: cmd.id, ...result }));
  });
  ws.on('close', () => {
    const conns = sessions.get(ws.user);
    if (conns) { conns.delete(ws); if (!conns.size) sessions.delete(ws.user); }
    for (const u of ws.watching) { const set = watchers.get(u); if (set) set.delete(ws); }
  });
  ws.on('error', () => {});
});
wss.on('listening', () => console.log(JSON.stringify({ event: 'ready', port: opts.port })));
process.on('SIGTERM', () => process.exit(0));
