// libnftables (the library behind the nft command) imported as the CNFTables module, for flannel-udp's
// nftables masquerade rules. Only the header lives here.
#ifndef CNFTABLES_H
#define CNFTABLES_H
#include <nftables/libnftables.h>
#endif
