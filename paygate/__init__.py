"""The payment gateways' callback edge (role ``paygate``): signed callbacks in, payments booked over URFA."""
