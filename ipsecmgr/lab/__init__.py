"""The network-namespace lab: topology, a TACACS+ server and client, a strongSwan peer."""
