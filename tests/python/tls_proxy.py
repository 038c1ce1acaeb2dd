"""A TLS-terminating TCP proxy for Dima's Kafka TLS test: clients speak TLS
to LISTEN_PORT (certificate CERT, key KEY); each connection is forwarded as
plain TCP to 127.0.0.1:ORIGIN_PORT (the test broker, which advertises the
proxy's address). With CLIENT_CA, clients must present a certificate that
CA signed (mutual TLS). Python's standard library only. Prints "ready" once
listening.

  tls_proxy.py LISTEN_PORT ORIGIN_PORT CERT KEY [CLIENT_CA]
"""

import asyncio
import ssl
import sys


async def pipe(reader, writer):
    try:
        while True:
            data = await reader.read(65536)
            if not data:
                break
            writer.write(data)
            await writer.drain()
    except (ConnectionError, ssl.SSLError):
        pass
    finally:
        writer.close()


async def main():
    listen, origin, cert, key = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3], sys.argv[4]
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert, key)
    if len(sys.argv) > 5:
        context.verify_mode = ssl.CERT_REQUIRED
        context.load_verify_locations(sys.argv[5])

    async def serve(client_reader, client_writer):
        try:
            broker_reader, broker_writer = await asyncio.open_connection("127.0.0.1", origin)
        except OSError:
            client_writer.close()
            return
        await asyncio.gather(pipe(client_reader, broker_writer), pipe(broker_reader, client_writer))

    server = await asyncio.start_server(serve, "127.0.0.1", listen, ssl=context)
    print("ready", flush=True)
    async with server:
        await server.serve_forever()


asyncio.run(main())
