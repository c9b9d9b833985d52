// libmnl plus the kernel's rtnetlink headers, imported as the CNetlink module.
// Only headers live here; anything that is a macro gets a function in CShims.
#ifndef CNETLINK_H
#define CNETLINK_H
#include <libmnl/libmnl.h>
#include <linux/netlink.h>
#include <linux/rtnetlink.h>
#include <linux/if_link.h>
#include <linux/if_addr.h>
#include <linux/neighbour.h>
#include <linux/if.h>
#endif
