"""`braid dispatch`, `braid room participants` and `braid send-data`: what `lk` users reach for, through the
official livekit-api client (results printed as JSON, like `braid room`)."""

from __future__ import annotations

import argparse
import json
import sys

from braid.cli import (CLIError, UsageError, add_server_args, call_api, parse_attribute, print_message)


# --- braid dispatch create|list|delete ---------------------------------------------------------------------


def add_dispatch_commands(subparsers) -> None:
    dispatch = subparsers.add_parser("dispatch", help="dispatch agents to rooms (AgentDispatchService API)",
                                     description="Create, list and delete agent dispatches; JSON output.")
    sub = dispatch.add_subparsers(dest="dispatch_command", metavar="COMMAND", required=True)

    p = sub.add_parser("create", help="dispatch an agent to a room (created if missing)")
    add_server_args(p)
    p.add_argument("--room", required=True)
    p.add_argument("--agent-name", required=True, help="the agent_name its workers registered with")
    p.add_argument("--metadata", default="", help="job metadata handed to the agent")
    p.set_defaults(handler=cmd_dispatch_create, prog=p.prog)

    p = sub.add_parser("list", help="the dispatches of a room and their jobs")
    add_server_args(p)
    p.add_argument("--room", required=True)
    p.set_defaults(handler=cmd_dispatch_list, prog=p.prog)

    p = sub.add_parser("delete", help="delete a dispatch, ending its jobs")
    add_server_args(p)
    p.add_argument("--room", required=True)
    p.add_argument("id", help="dispatch id (AD_...)")
    p.set_defaults(handler=cmd_dispatch_delete, prog=p.prog)


def cmd_dispatch_create(args: argparse.Namespace) -> int:
    from livekit.protocol.agent_dispatch import CreateAgentDispatchRequest

    request = CreateAgentDispatchRequest(room=args.room, agent_name=args.agent_name, metadata=args.metadata)
    print_message(call_api(args, lambda lk: lk.agent_dispatch.create_dispatch(request)))
    return 0


def cmd_dispatch_list(args: argparse.Namespace) -> int:
    from livekit.protocol.agent_dispatch import ListAgentDispatchResponse

    dispatches = call_api(args, lambda lk: lk.agent_dispatch.list_dispatch(args.room))
    print_message(ListAgentDispatchResponse(agent_dispatches=dispatches))
    return 0


def cmd_dispatch_delete(args: argparse.Namespace) -> int:
    print_message(call_api(args, lambda lk: lk.agent_dispatch.delete_dispatch(args.id, args.room)))
    return 0


# --- braid room participants list|get|remove|mute|update ---------------------------------------------------


def add_participant_commands(room_subparsers) -> None:
    participants = room_subparsers.add_parser("participants", help="the participants of a room")
    sub = participants.add_subparsers(dest="participants_command", metavar="COMMAND", required=True)

    def command(name: str, help_text: str, handler, identity: bool = True) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_text)
        add_server_args(p)
        p.add_argument("--room", required=True)
        if identity:
            p.add_argument("identity", help="participant identity")
        p.set_defaults(handler=handler, prog=p.prog)
        return p

    command("list", "list the participants", cmd_participants_list, identity=False)
    command("get", "one participant", cmd_participants_get)
    command("remove", "disconnect a participant", cmd_participants_remove)
    p = command("mute", "mute (or --unmute) a published track", cmd_participants_mute)
    p.add_argument("--track", required=True, help="track sid (TR_...)")
    p.add_argument("--unmute", action="store_true")
    p = command("update", "change name, metadata, attributes or permissions", cmd_participants_update)
    p.add_argument("--name")
    p.add_argument("--metadata")
    p.add_argument("--attribute", action="append", type=parse_attribute, default=[], metavar="KEY=VALUE")
    p.add_argument("--permissions", help='JSON ParticipantPermission, e.g. {"can_publish": false}')


def cmd_participants_list(args: argparse.Namespace) -> int:
    from livekit.protocol.room import ListParticipantsRequest

    print_message(call_api(args, lambda lk: lk.room.list_participants(ListParticipantsRequest(room=args.room))))
    return 0


def _identity(args: argparse.Namespace):
    from livekit.protocol.room import RoomParticipantIdentity

    return RoomParticipantIdentity(room=args.room, identity=args.identity)


def cmd_participants_get(args: argparse.Namespace) -> int:
    print_message(call_api(args, lambda lk: lk.room.get_participant(_identity(args))))
    return 0


def cmd_participants_remove(args: argparse.Namespace) -> int:
    print_message(call_api(args, lambda lk: lk.room.remove_participant(_identity(args))))
    print(f"removed {args.identity} from {args.room}", file=sys.stderr)
    return 0


def cmd_participants_mute(args: argparse.Namespace) -> int:
    from livekit.protocol.room import MuteRoomTrackRequest

    request = MuteRoomTrackRequest(room=args.room, identity=args.identity, track_sid=args.track,
                                   muted=not args.unmute)
    print_message(call_api(args, lambda lk: lk.room.mute_published_track(request)))
    return 0


def cmd_participants_update(args: argparse.Namespace) -> int:
    from google.protobuf import json_format
    from livekit.protocol.room import UpdateParticipantRequest

    request = UpdateParticipantRequest(room=args.room, identity=args.identity, name=args.name or "",
                                       metadata=args.metadata or "", attributes=dict(args.attribute))
    if args.permissions:
        try:
            json_format.Parse(args.permissions, request.permission)
        except json_format.ParseError as exc:
            raise UsageError(f"invalid --permissions: {exc}") from None
    elif not (args.name or args.metadata or args.attribute):
        raise UsageError("nothing to update: give --name, --metadata, --attribute or --permissions")
    print_message(call_api(args, lambda lk: lk.room.update_participant(request)))
    return 0


# --- braid send-data -------------------------------------------------------------------------------------


def add_send_data_command(subparsers) -> None:
    p = subparsers.add_parser("send-data", help="send a data packet to a room's participants (RoomService)")
    add_server_args(p)
    p.add_argument("--room", required=True)
    p.add_argument("data", help="the payload (text), or - to read it from stdin")
    p.add_argument("--topic")
    p.add_argument("--identity", action="append", default=[], dest="identities", metavar="IDENTITY",
                   help="only to this participant (repeatable); everyone when absent")
    p.add_argument("--lossy", action="store_true", help="send unreliably (default: reliable)")
    p.set_defaults(handler=cmd_send_data, prog=p.prog)


def cmd_send_data(args: argparse.Namespace) -> int:
    from livekit.protocol.models import DataPacket
    from livekit.protocol.room import SendDataRequest

    payload = sys.stdin.buffer.read() if args.data == "-" else args.data.encode()
    if len(payload) > 64 * 1024:
        raise CLIError(f"payload of {len(payload)} bytes is over the 64 KiB a data packet may carry")
    request = SendDataRequest(room=args.room, data=payload, destination_identities=args.identities,
                              kind=DataPacket.LOSSY if args.lossy else DataPacket.RELIABLE)
    if args.topic:
        request.topic = args.topic
    call_api(args, lambda lk: lk.room.send_data(request))
    print(json.dumps({"room": args.room, "bytes": len(payload), "to": args.identities or "everyone"}))
    return 0
